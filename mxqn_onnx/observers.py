"""Streaming, mergeable statistics of activation tensors.

A :class:`TensorHistogram` counts the float32 values of a tensor in bins read straight off
their bit patterns: sign, the 8 exponent bits and the top 5 mantissa bits give 32 bins per
octave over the whole float32 range (16,384 bins, each about 3% wide). One integer shift and
one ``bincount`` per batch, no logarithms, and memory that does not grow with the number of
samples. Counts add, so histograms merge across batches, processes and machines; the bins
are enough to score any candidate fixed-point or log quantizer
(:func:`mxqn_onnx.quantizers.best_fxp_binned`, :func:`~mxqn_onnx.quantizers.best_log_binned`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .quantizers import Bins

MANTISSA_BITS = 5
_SHIFT = 23 - MANTISSA_BITS
N_BINS = 1 << (32 - _SHIFT)
_HALF = N_BINS // 2
_EXP_MASK = 0xFF


def _bin_edges() -> tuple:
    """Signed ``[lo, hi)`` of every bin (exponent 0, i.e. zeros and denormals, maps to 0)."""
    idx = np.arange(N_BINS)
    negative = idx >= _HALF
    mag = idx % _HALF
    exp = (mag >> MANTISSA_BITS) & _EXP_MASK
    man = mag & ((1 << MANTISSA_BITS) - 1)
    base = np.ldexp(1.0, exp - 127)
    lo = base * (1.0 + man / 2.0**MANTISSA_BITS)
    hi = base * (1.0 + (man + 1) / 2.0**MANTISSA_BITS)
    zero = exp == 0
    lo[zero] = 0.0
    hi[zero] = 0.0
    nonfinite = exp == _EXP_MASK
    lo[nonfinite] = np.nan
    hi[nonfinite] = np.nan
    s_lo = np.where(negative, -hi, lo)
    s_hi = np.where(negative, -lo, hi)
    return s_lo, s_hi, nonfinite


_LO, _HI, _NONFINITE = _bin_edges()


class NonFiniteError(ValueError):
    """A calibration tensor held NaN or Inf."""


class TensorHistogram:
    """Streaming histogram of one tensor's values, plus exact min and max."""

    def __init__(self, name: str = "", channel_axis: Optional[int] = None) -> None:
        self.name = name
        self.counts = np.zeros(N_BINS, dtype=np.int64)
        self.min = float("inf")
        self.max = float("-inf")
        # per-channel sums along ``channel_axis`` (for bias correction); None: not tracked
        self.channel_axis = channel_axis
        self.channel_sum: Optional[np.ndarray] = None
        self.channel_count = 0

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, x: np.ndarray) -> None:
        """Add a batch of values (any shape, cast to float32)."""
        batch = np.ascontiguousarray(x, dtype=np.float32)
        x = batch.ravel()
        if x.size == 0:
            return
        idx = x.view(np.uint32) >> np.uint32(_SHIFT)
        counts = np.bincount(idx, minlength=N_BINS)
        if counts[_NONFINITE].any():
            raise NonFiniteError(
                f"calibration tensor '{self.name}' contains NaN or Inf values; "
                "check the model and the calibration data"
            )
        self.counts += counts
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        if self.channel_axis is not None and batch.ndim > self.channel_axis:
            self._add_channel_sums(batch)

    def _add_channel_sums(self, batch: np.ndarray) -> None:
        axis = self.channel_axis % batch.ndim
        other = tuple(i for i in range(batch.ndim) if i != axis)
        sums = batch.sum(axis=other, dtype=np.float64)
        if self.channel_sum is None:
            self.channel_sum = sums
        elif self.channel_sum.shape == sums.shape:
            self.channel_sum += sums
        else:  # channel count changed between batches: not a per-channel tensor after all
            self.channel_axis = None
            self.channel_sum = None
            return
        self.channel_count += batch.size // batch.shape[axis]

    @property
    def channel_mean(self) -> Optional[np.ndarray]:
        """Mean value of each channel along ``channel_axis`` (None when not tracked)."""
        if self.channel_sum is None or self.channel_count == 0:
            return None
        return self.channel_sum / self.channel_count

    def merge(self, other: "TensorHistogram") -> "TensorHistogram":
        """Add another histogram's counts into this one (returns self)."""
        was_empty = self.total == 0
        self.counts += other.counts
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if was_empty and self.channel_sum is None and other.channel_sum is not None:
            self.channel_axis = other.channel_axis
            self.channel_sum, self.channel_count = other.channel_sum.copy(), other.channel_count
        elif self.channel_sum is not None and other.channel_sum is not None \
                and self.channel_sum.shape == other.channel_sum.shape:
            self.channel_sum = self.channel_sum + other.channel_sum
            self.channel_count += other.channel_count
        elif other.total:
            self.channel_sum, self.channel_count = None, 0
        return self

    @property
    def signed(self) -> bool:
        """True when a negative value was seen (activations are unsigned otherwise)."""
        return self.min < 0

    def bins(self) -> Bins:
        """The non-empty bins, clamped to the observed min/max."""
        nz = np.flatnonzero(self.counts)
        lo = np.maximum(_LO[nz], self.min)
        hi = np.minimum(_HI[nz], self.max)
        hi = np.maximum(hi, lo)
        return Bins(lo=lo, hi=hi, count=self.counts[nz].astype(np.float64))

    def state_dict(self) -> dict:
        """Plain arrays for saving (``np.savez``) and merging elsewhere."""
        return {"counts": self.counts.copy(), "min": self.min, "max": self.max}

    @classmethod
    def from_state(cls, state: dict, name: Optional[str] = None) -> "TensorHistogram":
        h = cls(name or "")
        h.counts = np.asarray(state["counts"], dtype=np.int64).copy()
        h.min, h.max = float(state["min"]), float(state["max"])
        return h
