"""Outputs written atomically: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from .errors import MxqnError


def save_model_atomic(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, model.SerializeToString(), "model")


def write_atomic(path, data: bytes, what: str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    An error or interrupt part-way leaves no output (and an older file at ``path`` intact);
    errors become one-line :class:`MxqnError` naming ``what`` was being written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise MxqnError(f"{folder}: output folder {what}")
    try:
        # os.access() says yes to root even on read-only mounts: try the real thing instead
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MxqnError(f"{folder}: cannot write to the output folder ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp creates the file 0600; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise MxqnError(f"{path}: cannot write the {what} ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
