"""Streaming, mergeable statistics of activation tensors.

A :class:`TensorHistogram` counts the float32 values of a tensor in bins read straight off
their bit patterns: sign, the 8 exponent bits and the top 5 mantissa bits give 32 bins per
octave over the whole float32 range (16,384 bins, each about 3% wide). One integer shift and
one ``bincount`` per batch, no logarithms, and memory that does not grow with the number of
samples. Counts add, so histograms merge across batches, processes and machines; the bins
are enough to score any candidate fixed-point or log quantizer
(:func:`mxqn_onnx.quant.quantizers.best_fxp_binned`, :func:`~mxqn_onnx.quant.quantizers.best_log_binned`).

``bincount`` is the one costly step (about 10 ns per value: ReLU outputs send half their values
to the same zero bin, which serialises the increments). For very large tensors ``update`` can
count a deterministic, evenly spread subset instead (``max_elements``), weighting each sampled
value by the stride so that batches still contribute in proportion to their size; min, max
(counted once each, as a lone outlier can decide the clipping error) and the NaN/Inf check
always see every value.
"""

from __future__ import annotations

from math import gcd
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..quant.quantizers import Bins

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


def sample_stride(shape: Sequence[int], max_elements: Optional[int]) -> int:
    """Stride for sampling a tensor of ``shape`` down to at most ``max_elements`` values.

    The stride is coprime with every dimension: a stride dividing the row length would keep
    visiting the same columns (or, dividing a plane, the same channels).
    """
    n = int(np.prod(shape, dtype=np.int64))
    if not max_elements or n <= max_elements:
        return 1
    s = -(-n // int(max_elements))
    while any(d > 1 and gcd(s, int(d)) != 1 for d in shape):
        s += 1
    return s


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
        #: results computed from these counts (quantizer choices, keyed by their arguments):
        #: mixed precision asks for the same ones many times; update and merge clear it
        self.derived: Dict[tuple, object] = {}

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def update(self, x: np.ndarray, max_elements: Optional[int] = None, channel_skip: int = 0) -> None:
        """Add a batch of values (any shape, cast to float32).

        With ``max_elements``, a tensor larger than that is histogrammed from every s-th value
        (``s`` the smallest stride giving at most ``max_elements`` values and sharing no factor
        with any dimension, so the sample cycles through every row, column and channel), each
        counted ``s`` times. Without it (the default) every value is counted.
        ``channel_skip``: leading rows (samples) left out of the channel sums (held back).
        """
        self.derived.clear()
        batch = np.ascontiguousarray(x, dtype=np.float32)
        x = batch.ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())  # NaN propagates; +-Inf shows up here too
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise NonFiniteError(
                f"calibration tensor '{self.name}' contains NaN or Inf values; "
                "check the model and the calibration data"
            )
        stride = sample_stride(batch.shape, max_elements)
        sample = x[::stride] if stride > 1 else x
        counts = np.bincount(sample.view(np.uint32) >> np.uint32(_SHIFT), minlength=N_BINS)
        if stride > 1:
            counts *= stride
            # a lone outlier would usually fall between samples, yet it alone can decide the
            # clipping error: count the two extremes at their true weight of one
            ext = np.array([lo, hi], dtype=np.float32).view(np.uint32) >> np.uint32(_SHIFT)
            np.add.at(counts, ext, 1)
        self.counts += counts
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        if self.channel_axis is not None and batch.ndim > self.channel_axis:
            if channel_skip and batch.ndim > 1 and self.channel_axis % batch.ndim != 0:
                batch = batch[channel_skip:]
            if batch.size:
                self._add_channel_sums(batch)

    def _add_channel_sums(self, batch: np.ndarray) -> None:
        axis = self.channel_axis % batch.ndim
        # [outer, C, inner]: float32 sums along the contiguous inner rows (short, so exact
        # enough), float64 across them; 10x faster than one strided float64 reduction
        outer = int(np.prod(batch.shape[:axis], dtype=np.int64))
        rows = batch.reshape(outer, batch.shape[axis], -1)
        sums = rows.sum(axis=2).sum(axis=0, dtype=np.float64)
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
        self.derived.clear()
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


class TensorSample:
    """The first ``count`` samples (batch rows) of a tensor, copied out of each batch.

    The data-aware steps (rounding, the layer-output objective) need real input patches, not
    only a histogram. Samples add along the batch axis, so they merge like histograms (up to
    ``count``); ``count`` can be lowered once the per-sample size is known (a memory budget).
    """

    def __init__(self, name: str = "", count: int = 0) -> None:
        self.name = name
        self.count = count
        self.parts: list = []
        self.have = 0

    def update(self, x: np.ndarray, skip: int = 0) -> None:
        """Keep the leading rows of ``x`` (after ``skip`` held-back ones) until ``count``
        samples are held (always a copy: calibration reuses its output buffers)."""
        if self.have >= self.count or np.ndim(x) == 0:
            return
        x = x[skip:]
        if len(x) == 0:
            return
        take = np.array(x[: self.count - self.have], dtype=np.float32)
        self.parts.append(take)
        self.have += len(take)

    def merge(self, other: "TensorSample") -> "TensorSample":
        for part in other.parts:
            self.update(part)
        return self

    def array(self) -> Optional[np.ndarray]:
        """All kept samples as one array (None when nothing was kept)."""
        if not self.parts:
            return None
        if len(self.parts) > 1 and any(p.shape[1:] != self.parts[0].shape[1:] for p in self.parts):
            return self.parts[0]  # dynamic shapes: the first batch's shape only
        return np.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]


#: Bytes of FP32 outputs the calibration run keeps for verification.
REFERENCE_BUDGET = 256 * 2 ** 20


class ReferenceOutputs:
    """The FP32 model's outputs for the first ``limit`` calibration samples.

    Filled by the calibration run, which computes them anyway; read back by :func:`compare`
    so verification does not run the FP32 model a second time. Holds at most ``budget`` bytes
    (it stops keeping, never grows past it); outputs without a leading batch axis are not kept.
    """

    def __init__(self, names: Sequence[str], limit: int, budget: int = REFERENCE_BUDGET) -> None:
        self.names = list(names)
        self.limit = limit
        self.budget = budget
        self.count = 0
        self._parts: List[List[np.ndarray]] = []
        self._bytes = 0
        self._joined: Optional[List[np.ndarray]] = None

    def wants(self) -> bool:
        return self.count < self.limit

    def add(self, outputs: Sequence[np.ndarray], m: int) -> None:
        """Keep the first samples of one run's outputs (copies: the run's buffers are reused)."""
        take = min(m, self.limit - self.count)
        if take <= 0:
            return
        if not all(np.ndim(o) and np.shape(o)[0] == m for o in outputs):
            self.limit = self.count  # no batch axis to cut samples from: verification runs FP32
            return
        part = [np.array(o[:take]) for o in outputs]
        size = sum(a.nbytes for a in part)
        if self._bytes + size > self.budget:
            self.limit = self.count
            return
        self._parts.append(part)
        self._bytes += size
        self.count += take
        self._joined = None

    def get(self, offset: int, n: int) -> Optional[List[np.ndarray]]:
        """Outputs of samples ``offset .. offset + n`` (None if not all of them were kept)."""
        if offset + n > self.count:
            return None
        if self._joined is None:
            self._joined = [np.concatenate([p[i] for p in self._parts]) for i in range(len(self.names))]
            self._parts = [self._joined]
        return [a[offset:offset + n] for a in self._joined]
