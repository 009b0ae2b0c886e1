"""The C runtime helpers of the export against their Python specification (kernels.py), on the
edge cases: shifts of 0 (per-channel alignments), ties, clipping, NaN, tiny and huge floats."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from mxqn_onnx.integer.c_kernels import RUNTIME
from mxqn_onnx.integer.c_run import compiler
from mxqn_onnx.integer.kernels import fixed_from_float, shift_round

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler")

PROG = r"""
#include <stdint.h>
#include <stdio.h>
#include <math.h>
#include <float.h>
%s
int main(void)
{
    long long a;
    int s, lo, hi;
    float x;
    char op;
    while (scanf(" %%c", &op) == 1) {
        if (op == 's' && scanf("%%lld %%d", &a, &s) == 2)
            printf("%%lld\n", (long long)mxqn_srne((int64_t)a, s));
        else if (op == 'q' && scanf("%%lld %%d %%d %%d", &a, &s, &lo, &hi) == 4)
            printf("%%d %%d\n", (int)mxqn_fixq((int64_t)a, s, lo, hi),
                   (a >= INT32_MIN && a <= INT32_MAX) ? (int)mxqn_fixq32((int32_t)a, s, lo, hi) : (int)mxqn_fixq((int64_t)a, s, lo, hi));
        else if (op == 'f' && scanf("%%a %%d %%d %%d", &x, &s, &lo, &hi) == 4)
            printf("%%d\n", (int)mxqn_fixq_f(x, ldexpf(1.0f, s), lo, hi));
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    (d / "t.c").write_text(PROG % RUNTIME)
    exe = d / "t"
    p = subprocess.run([compiler(), "-O2", "-std=c99", "-Wall", "-o", str(exe), str(d / "t.c"), "-lm"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return exe


def _run(exe, lines):
    p = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    return p.stdout.split("\n")


def test_shift_round_half_even_including_shift_zero(prog):
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.integers(-2 ** 40, 2 ** 40, 400), np.arange(-9, 10), [2 ** 61, -2 ** 61]])
    s = np.concatenate([rng.integers(0, 45, 400), np.zeros(19, int), [0, 0]])  # s = 0: no change
    out = _run(prog, [f"s {x} {y}" for x, y in zip(a, s)])
    got = np.array([int(v) for v in out if v], np.int64)
    np.testing.assert_array_equal(got, shift_round(a.astype(np.int64), s.astype(np.int64)))


def test_requantization_int32_and_int64_agree_with_the_executor(prog):
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.integers(-2 ** 31 + 1, 2 ** 31 - 1, 600), [0, 1, -1, 2 ** 31 - 1, -2 ** 31 + 1]])
    s = np.concatenate([rng.integers(-6, 34, 600), [0, 1, 1, 31, 32]])
    lo, hi = -128, 127
    out = _run(prog, [f"q {x} {y} {lo} {hi}" for x, y in zip(a, s)])
    got = np.array([[int(t) for t in v.split()] for v in out if v], np.int64)
    ref = np.clip(shift_round(np.clip(a, None, None).astype(np.int64), s.astype(np.int64)), lo, hi)
    left = s < 0  # left shifts: the C clips first (no overflow); same codes
    ref[left] = np.clip(np.clip(a[left], lo, hi) << -s[left], lo, hi)
    np.testing.assert_array_equal(got[:, 0], ref)
    np.testing.assert_array_equal(got[:, 1], ref)


def test_float_quantization_without_doubles_matches_the_executor(prog):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(800).astype(np.float32) * 40,
                        (np.arange(-20, 21) / 2).astype(np.float32),  # ties
                        np.array([1e-40, -1e-40, 3e38, -3e38, np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)])
    for frac, bits, signed in ((0, 8, True), (3, 8, False), (-2, 6, True), (7, 16, True), (12, 16, False)):
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        out = _run(prog, [f"f {float(v).hex() if np.isfinite(v) else ('inf' if v > 0 else '-inf') if not np.isnan(v) else 'nan'} "
                          f"{frac} {lo} {hi}" for v in x])
        got = np.array([int(v) for v in out if v], np.int64)
        np.testing.assert_array_equal(got, fixed_from_float(x, bits, frac, signed).codes)
