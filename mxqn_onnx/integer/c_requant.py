"""C export: the cheap requantization at the end of the fast kernels (one add, one shift, a clamp).

The generic epilogue (:func:`mxqn_onnx.integer.c_layers._epilogue`) calls ``mxqn_fixq32``, which
branches on the shift's sign and range and rounds through a remainder compare: 20-30 instructions
per output on a Cortex-M4, as many as the MACs of a depthwise 3x3 or of a 16-channel 1x1 layer.
For the usual epilogue (int32 sum, bias stored as int32, Relu/Clip exact on the sum, a fixed-point
quantizer shifting right by 1..30 bits, or no quantizer at all) the same codes come from

    t = sum + bh[o]                 bh = bias + 2^(s-1): the rounding half folded into the bias
    q = t >> s                      floor((v + half) / 2^s): v rounded half up
    if (t mod 2^s == 0) q &= ~1     a tie (v exactly halfway) went up: take the even neighbour
    y = clamp(q, L[o], H[o])        Relu, Clip and the code range in one clamp

Rounding half to even is monotone, so ``rne(clip(v, a, b)) = clip(rne(v), rne(a), rne(b))``;
Relu is ``clip(v, 0, inf)``, and clamps composed are one clamp whose bounds are the first
clamp's bounds clamped by the second. ``t`` stays exact in int32 because the planner's bound on
``|sum + bias|`` plus ``2^(s-1)`` is checked below 2^31 here; otherwise (or with a shifted sum, a
float32-rounded accumulator, a log quantizer, a left shift) the layer keeps the generic epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .c_kernels import Consts, per_channel
from .c_ops import Step

#: the runtime helper (written once into model.c)
RQ = r"""
/* the fast kernels' requantization (c_requant.py): t = sum + bias + 2^(s-1), exact in int32,
 * 1 <= s <= 30; the code clip(rne((t - 2^(s-1)) * 2^-s), lo, hi) */
static inline int32_t mxqn_rq(int32_t t, int s, int32_t lo, int32_t hi)
{
    int32_t q = t >= 0 ? (t >> s) : ~((~t) >> s); /* floor(t / 2^s): one arithmetic shift */
    if (((uint32_t)t << (32 - s)) == 0u)
        q &= ~1; /* a tie rounded up: the even neighbour */
    return q < lo ? lo : (q > hi ? hi : q);
}

static inline int32_t mxqn_clamp(int32_t v, int32_t lo, int32_t hi)
{
    return v < lo ? lo : (v > hi ? hi : v);
}
"""

LIMIT = 2 ** 31


def _rne(v: int, s: int) -> int:
    """``v * 2^-s`` rounded half to even (exact integers)."""
    if s <= 0:
        return v << -s
    q, r = divmod(v, 1 << s)
    h = 1 << (s - 1)
    return q + (1 if r > h or (r == h and q & 1) else 0)


@dataclass
class FastRequant:
    """Per-channel C expressions (a literal when uniform) of one layer's requantization."""

    bh: str  #: bias plus the rounding half (int32)
    s: Optional[str]  #: the right shift; None: no quantizer, the value is stored clamped
    lo: str
    hi: str
    ctype: str  #: the stored type

    def store(self, sum_expr: str, bh: Optional[str] = None, s: Optional[str] = None,
              lo: Optional[str] = None, hi: Optional[str] = None) -> str:
        """C expression of the stored value for the int32 sum ``sum_expr`` (the channel's
        parameters as given, or the per-channel expressions)."""
        bh, s, lo, hi = bh or self.bh, s or self.s, lo or self.lo, hi or self.hi
        if self.s is None:
            return f"({self.ctype})mxqn_clamp({sum_expr} + {bh}, {lo}, {hi})"
        return f"({self.ctype})mxqn_rq({sum_expr} + {bh}, {s}, {lo}, {hi})"

    def debug(self, index: str, sum_expr: str, bh: Optional[str] = None, s: Optional[str] = None) -> str:
        """The debug build's record of the accumulator (sum + bias) of output ``index``."""
        bh, s = bh or self.bh, s or self.s
        half = "" if self.s is None else f" - ((int32_t)1 << ({s} - 1))"
        return f"MXQN_DBG_ACC({index}, {sum_expr} + {bh}{half});"

    def hoist(self, suffix: str = "") -> List[str]:
        """Declarations of the channel's parameters as locals (for a kernel with the channel outer)."""
        out = [f"const int32_t bh{suffix} = {self.bh};", f"const int32_t lo{suffix} = {self.lo};",
               f"const int32_t hi{suffix} = {self.hi};"]
        if self.s is not None:
            out.append(f"const int s{suffix} = {self.s};")
        return out

    def debug_hoisted(self, index: str, sum_expr: str, suffix: str = "") -> str:
        return self.debug(index, sum_expr, f"bh{suffix}", f"s{suffix}" if self.s is not None else None)

    def store_hoisted(self, sum_expr: str, suffix: str = "") -> str:
        return self.store(sum_expr, f"bh{suffix}", f"s{suffix}" if self.s is not None else None,
                          f"lo{suffix}", f"hi{suffix}")


def _channels(vals, n: int) -> List[Optional[int]]:
    a = list(vals) if isinstance(vals, (list, tuple)) else np.asarray(vals).reshape(-1).tolist()
    if len(a) == 1:
        a = a * n
    if len(a) != n:
        raise ValueError("per-channel values of another length")
    return [None if v is None else int(v) for v in a]


def fast_requant(consts: Consts, s: Step, idx: str = "o") -> Optional[FastRequant]:
    """The layer's requantization as :class:`FastRequant`, or None when it needs the generic one."""
    p = s.p
    acc = p["acc"]
    y = s.outs[0]
    O = p["O"]
    if np.any(p["rs"]) or acc.bound >= LIMIT or acc.needs_r24() or y.ctype == "int64_t":
        return None
    if p["bias"] is not None and not p.get("bias_is_stored"):
        return None
    bias = [0] * O if p["bias"] is None else [int(b) for b in np.asarray(p["bias"]).reshape(-1)]
    inf = float("inf")
    lo: list = [-inf] * O  # the stored value is clamp(rne(v), lo, hi): its values at v = -inf, +inf
    hi: list = [inf] * O
    shift = None

    def cl(v, a, b):  # the integer steps' clip: below a -> a, then above b -> b
        v = a if v < a else v
        return b if v > b else v

    for e in p["epi"]:
        if e.op == "int_relu":
            lo, hi = [cl(v, 0, inf) for v in lo], [cl(v, 0, inf) for v in hi]
        elif e.op == "int_clip":
            a = [-inf if v is None else v for v in _channels(e.p["lo"], O)]
            b = [inf if v is None else v for v in _channels(e.p["hi"], O)]
            lo = [cl(v, x, z) for v, x, z in zip(lo, a, b)]
            hi = [cl(v, x, z) for v, x, z in zip(hi, a, b)]
        elif e.op == "quant_int":
            q = e.outs[0].quant
            if q["kind"] != "fixed" or e is not p["epi"][-1]:
                return None
            shift = _channels(e.p["shift"], O)
            if min(shift) < 1 or max(shift) > 30 or acc.bound + (1 << (max(shift) - 1)) >= LIMIT:
                return None
            rn = lambda v, sh: v if v in (inf, -inf) else _rne(int(v), sh)  # noqa: E731
            lo = [cl(rn(v, sh), q["lo"], q["hi"]) for v, sh in zip(lo, shift)]
            hi = [cl(rn(v, sh), q["lo"], q["hi"]) for v, sh in zip(hi, shift)]
        else:
            return None
    if shift is None:  # the int32 value itself, clamped
        if y.ctype != "int32_t":
            return None
        lo = [int(cl(v, -LIMIT, LIMIT - 1)) for v in lo]
        hi = [int(cl(v, -LIMIT, LIMIT - 1)) for v in hi]
        bh = bias
    else:
        lo, hi = [int(v) for v in lo], [int(v) for v in hi]
        bh = [b + (1 << (sh - 1)) for b, sh in zip(bias, shift)]
    shift_c = None if shift is None else per_channel(consts, shift, "int8_t", "rqs", idx)
    lit = lambda v: "(-2147483647 - 1)" if v == -LIMIT else str(v)  # noqa: E731
    pc = lambda vals, pre: (lit(vals[0]) if len(set(vals)) == 1  # noqa: E731
                            else f"{consts.array('int32_t', vals, pre)}[{idx}]")
    return FastRequant(bh=pc(bh, "rqb"), s=shift_c, lo=pc(lo, "rqlo"), hi=pc(hi, "rqhi"), ctype=y.ctype)


def quant_rq(consts: Consts, x, y, p: dict) -> Optional[str]:
    """A quantizer step on int32 values (``x[i]``, channel ``c``) as one ``mxqn_rq``, or None
    when it needs the generic ``mxqn_fixq`` (log codes, left shifts, float32-rounded values)."""
    q = y.quant
    if q["kind"] != "fixed" or x.ctype != "int32_t" or (x.needs_r24() and not x.direct):
        return None
    shift = np.asarray(p["shift"]).reshape(-1).astype(np.int64)
    if shift.min() < 1 or shift.max() > 30 or x.bound + (1 << (int(shift.max()) - 1)) >= LIMIT:
        return None
    sh = per_channel(consts, shift, "int8_t", "rqs", "c")
    half = per_channel(consts, [1 << (int(v) - 1) for v in shift], "int32_t", "rqh", "c")
    return f"({y.ctype})mxqn_rq(x[i] + {half}, {sh}, {q['lo']}, {q['hi']})"
