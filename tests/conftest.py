import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return MODELS / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_calib() -> Path:
    return MODELS / "digits_calib.npz"


@pytest.fixture(scope="session")
def digits_test() -> Path:
    return MODELS / "digits_test.npz"


def run_cli(*args: str):
    """Run ``mxqn-onnx`` in a subprocess as a user would; returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "mxqn_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)
