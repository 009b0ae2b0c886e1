"""C export, stage 2: C text for the runtime helpers and for each step of the plan.

Every function here returns C99 source. Quantized layers and the integer ops between them
use integer arithmetic only (int32/int64 sums, shifts, compares); the helpers below are the
C counterparts of :mod:`mxqn_onnx.integer.kernels`'s ``shift_round``, ``fixed_from_acc``,
``LogTable.quantize_acc`` and its log-activation expansion, and of the float32 rounding the
executor applies when an accumulator enters a float op.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from .c_ops import Val

TYPE_CODE = {"int8_t": 0, "uint8_t": 1, "int16_t": 2, "uint16_t": 3, "int32_t": 4, "int64_t": 5, "float": 6}

RUNTIME = r"""
/* ---------------------------------------------------------------- integer helpers */

/* a * 2^-s rounded half to even, for s >= 0: arithmetic shift plus the rounding bit
 * (round up when the dropped bits exceed half, or equal half and the kept LSB is odd). */
static inline int64_t mxqn_srne(int64_t a, int s)
{
    int64_t q, rem, half;
    if (s <= 0)
        return a; /* per-channel shifts may be 0 for some channels */
    if (s > 62)
        return 0; /* |a| < 2^62 everywhere in this program */
    q = a >= 0 ? (a >> s) : ~((~a) >> s); /* floor(a / 2^s) */
    rem = a - (int64_t)((uint64_t)q << s);
    half = (int64_t)1 << (s - 1);
    return q + ((rem > half || (rem == half && (q & 1))) ? 1 : 0);
}

/* fixed-point requantization: clip(rne(v * 2^-s), lo, hi); s < 0 is an exact left shift */
static inline int32_t mxqn_fixq(int64_t v, int s, int32_t lo, int32_t hi)
{
    if (s > 0) {
        v = mxqn_srne(v, s);
    } else if (s < 0) {
        if (v > hi)
            v = hi;
        else if (v < lo)
            v = lo;
        if (-s > 32)
            return v > 0 ? hi : (v < 0 ? lo : 0);
        v = (int64_t)((uint64_t)v << -s);
    }
    return v < lo ? lo : (v > hi ? hi : (int32_t)v);
}

/* mxqn_fixq for a sum known to fit int32: the same codes in 32-bit arithmetic (cheaper on a
 * 32-bit core); left shifts go through the 64-bit version */
static inline int32_t mxqn_fixq32(int32_t v, int s, int32_t lo, int32_t hi)
{
    if (s > 0) {
        int32_t q, rem, half;
        if (s > 31)
            return 0 < lo ? lo : (0 > hi ? hi : 0); /* |v| < 2^31: rounds to 0 */
        q = v >= 0 ? (v >> s) : ~((~v) >> s);
        rem = (int32_t)((uint32_t)v - ((uint32_t)q << s));
        half = (int32_t)((uint32_t)1 << (s - 1));
        v = q + ((rem > half || (rem == half && (q & 1))) ? 1 : 0);
    } else if (s < 0) {
        return mxqn_fixq((int64_t)v, s, lo, hi);
    }
    return v < lo ? lo : (v > hi ? hi : v);
}

/* log requantization of v (same fractional length as the thresholds): the code is
 * sign * (1 + number of thresholds <= |v|), 0 below the zero threshold */
static inline int32_t mxqn_logq(int64_t v, const int64_t *thr, int nthr, int64_t zero, int is_signed)
{
    int64_t a = v < 0 ? -v : v;
    int lo = 0, hi = nthr;
    if (v == 0 || a < zero || (v < 0 && !is_signed))
        return 0;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (thr[mid] <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return v < 0 ? -(lo + 1) : lo + 1;
}

/* log code c -> its level as an integer at the layer's base exponent: the 24-bit table
 * entry T24[r] shifted by q - 23 - e0, where n = q * 2^k + r (a shift and a 2^k-entry table) */
static inline int64_t mxqn_logx(int32_t c, const int32_t *t24, int k, int r0, int sbase)
{
    int j, s;
    int64_t m;
    if (c == 0)
        return 0;
    j = (c < 0 ? -c : c) - 1 + r0;
    s = sbase + (j >> k);
    m = t24[j & ((1 << k) - 1)];
    m = s >= 0 ? (int64_t)((uint64_t)m << s) : mxqn_srne(m, -s);
    return c < 0 ? -m : m;
}

static inline int mxqn_bitlen(uint64_t m)
{
    int n = 0;
    while (m >= 65536u) {
        m >>= 16;
        n += 16;
    }
    while (m) {
        m >>= 1;
        n++;
    }
    return n;
}

/* m rounded half to even to `keep` significant bits */
static inline uint64_t mxqn_rne_bits(uint64_t m, int keep)
{
    int s = mxqn_bitlen(m) - keep;
    uint64_t q, rem, half;
    if (s <= 0)
        return m;
    q = m >> s;
    rem = m & (((uint64_t)1 << s) - 1);
    half = (uint64_t)1 << (s - 1);
    q += (rem > half || (rem == half && (q & 1))) ? 1 : 0;
    return q << s;
}

/* the accumulator a as the float graph holds it: (float)(double)a, in integers */
static inline int64_t mxqn_f32(int64_t a)
{
    uint64_t m = a < 0 ? (uint64_t)0 - (uint64_t)a : (uint64_t)a;
    if (m < ((uint64_t)1 << 24))
        return a;
    m = mxqn_rne_bits(mxqn_rne_bits(m, 53), 24);
    return a < 0 ? -(int64_t)m : (int64_t)m;
}

/* an exact sum of two float32 values rounded once to float32, in integers */
static inline int64_t mxqn_f32_sum(int64_t a)
{
    uint64_t m = a < 0 ? (uint64_t)0 - (uint64_t)a : (uint64_t)a;
    if (m < ((uint64_t)1 << 24))
        return a;
    m = mxqn_rne_bits(m, 24);
    return a < 0 ? -(int64_t)m : (int64_t)m;
}

/* first output position o >= 0 whose input o * s + off is >= 0 */
static inline int mxqn_first(int off, int s)
{
    return off >= 0 ? 0 : (-off + s - 1) / s;
}

/* one past the last output position o < out whose input o * s + off is < n */
static inline int mxqn_end(int off, int n, int s, int out)
{
    int e;
    if (n - 1 - off < 0)
        return 0;
    e = (n - 1 - off) / s + 1;
    return e < out ? e : out;
}

static inline int mxqn_taps(int avail, int k, int d)
{
    /* number of kernel taps t < k with t * d < avail */
    int n;
    if (avail <= 0)
        return 0;
    n = (avail - 1) / d + 1;
    return n < k ? n : k;
}

/* ---------------------------------------------------------------- float boundary */

/* fixed-point quantization of a float: clip(rne(x * 2^f), lo, hi) with scale = 2^f. In float32:
 * x * 2^f is exact unless it is below 2^-126 (then any rounding gives 0) or overflows (then
 * the clip gives the bound); clipping to the integer bounds before rounding gives the same
 * codes; (v + 1.5 * 2^23) - 1.5 * 2^23 rounds half to even for |v| < 2^22. */
static inline int32_t mxqn_fixq_f(float x, float scale, int32_t lo, int32_t hi)
{
    float v = x * scale;
    if (v != v)
        return 0;
    if (v <= (float)lo)
        return lo;
    if (v >= (float)hi)
        return hi;
    v = (v + 12582912.0f) - 12582912.0f;
    return (int32_t)v;
}

static inline int32_t mxqn_fixq_d(float x, double scale, int32_t lo, int32_t hi)
{
    double v = rint((double)x * scale);
    if (v != v)
        return 0;
    return v < lo ? lo : (v > hi ? hi : (int32_t)v);
}

/* log quantization of a float by its float32 thresholds (level midpoints) */
static inline int32_t mxqn_logq_f(float x, const float *mids, int nm, float zero, int is_signed)
{
    float a = fabsf(x);
    int lo = 0, hi = nm;
    if (!(a >= zero) || (x < 0 && !is_signed))
        return 0;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (mids[mid] <= a)
            lo = mid + 1;
        else
            hi = mid;
    }
    return x < 0 ? -(lo + 1) : lo + 1;
}
"""


def c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def comment(s: str) -> str:
    return s.replace("*/", "* /").replace("\n", " ")


def int_lit(v: int) -> str:
    v = int(v)
    return f"INT64_C({v})" if not -(2 ** 31) < v < 2 ** 31 else str(v)


def hexf(e: int) -> str:
    """The double 2^e as an exact C99 hexadecimal literal."""
    return f"0x1p{int(e)}"


class Consts:
    """Constant arrays of the generated file, deduplicated by content."""

    def __init__(self):
        self.lines: List[str] = []
        self._seen: Dict[tuple, str] = {}
        self.bytes = 0

    def array(self, ctype: str, values, prefix: str, note: str = "", align: int = 0) -> str:
        """The name of a ``static const`` array of these values (``align``: at least that many
        bytes, for kernels that read it in words; 0 for the type's own)."""
        arr = np.asarray(values).reshape(-1)
        key = (ctype, align, arr.tobytes() if arr.dtype != object else tuple(arr.tolist()))
        if key in self._seen:
            return self._seen[key]
        name = f"{prefix}_{len(self._seen)}"
        self._seen[key] = name
        if ctype == "float":
            items = [repr(float(np.float32(v))) + "f" if np.isfinite(v) else ("INFINITY" if v > 0 else "-INFINITY")
                     for v in arr.astype(np.float32).tolist()]
            items = [s if "e" in s or "." in s or "INF" in s else s.replace("f", ".0f") for s in items]
        elif ctype == "int64_t":
            items = [int_lit(v) for v in arr.tolist()]
        else:
            items = [str(int(v)) for v in arr.tolist()]
        rows = [", ".join(items[i:i + 16]) for i in range(0, len(items), 16)] or ["0"]
        head = f"/* {comment(note)} */\n" if note else ""
        attr = f" MXQN_ALIGNED({align})" if align else ""
        self.lines.append(f"{head}static const {ctype} {name}[{max(len(items), 1)}]{attr} = {{\n    "
                          + ",\n    ".join(rows) + "\n};\n")
        self.bytes += max(len(items), 1) * {"int8_t": 1, "uint8_t": 1, "int16_t": 2, "uint16_t": 2,
                                             "int32_t": 4, "int64_t": 8, "float": 4}[ctype]
        return name


def per_channel(consts: Consts, values, ctype: str, prefix: str, idx: str = "c") -> str:
    """A C expression for a per-channel constant: a literal when uniform, else ``NAME[idx]``."""
    vals = np.asarray(values).reshape(-1)
    if len(set(vals.tolist())) == 1:
        return int_lit(vals[0]) if ctype == "int64_t" else str(int(vals[0]))
    return f"{consts.array(ctype, vals, prefix)}[{idx}]"


def ptr(v: Val, const: bool = False) -> str:
    if v.buf.external:
        return "g_in"
    q = "const " if const else ""
    return f"(({q}{v.ctype} *)(mxqn_arena + {v.buf.offset}))"


def chan_loop(v: Val, body: str) -> str:
    """Loop over the flat index ``i`` of ``v`` with ``c`` its fractional-length channel."""
    if v.nch == 1:
        return f"for (i = 0; i < {v.numel}L; i++) {{\n        {body}\n    }}"
    outer = v.numel // (v.nch * v.inner)
    return (f"for (i = 0, t = 0; t < {outer}L; t++)\n        for (c = 0; c < {v.nch}; c++)\n"
            f"            for (j = 0; j < {v.inner}L; j++, i++) {{\n                {body}\n            }}")


def loop_decls(v: Val) -> str:
    return "long i;" if v.nch == 1 else "long i, t, j;\n    int c;"


def load_int(v: Val, expr: str) -> str:
    """Read an int tensor element as the float graph sees it (float32-rounded accumulator)."""
    return f"mxqn_f32((int64_t){expr})" if v.needs_r24() else f"(int64_t){expr}"


def requant_code(consts: Consts, src: Val, out: Val, p: dict, v: str, idx: str) -> str:
    """C expression: the codes of quantizer ``out`` for the integer ``v`` in ``src``'s format."""
    q = out.quant
    if q["kind"] == "fixed":
        sh = per_channel(consts, p["shift"], "int8_t" if np.abs(p["shift"]).max() < 127 else "int32_t",
                         "qshift", idx)
        return f"({out.ctype})mxqn_fixq({v}, {sh}, {q['lo']}, {q['hi']})"
    tables = p["tables"]
    fs = sorted(tables)
    if "lshift" in p:
        v = f"(int64_t)((uint64_t)({v}) << {per_channel(consts, p['lshift'], 'int8_t', 'lsh', idx)})"
    m1 = len(out.table.mids)
    signed = int(q["signed"])
    if len(fs) == 1:
        thr, z = tables[fs[0]]
        name = consts.array("int64_t", thr, "thr", f"log thresholds of {q['node']} at fractional length {fs[0]}")
        return f"({out.ctype})mxqn_logq({v}, {name}, {m1}, {int_lit(z)}, {signed})"
    thr = np.stack([tables[f][0] for f in fs])
    name = consts.array("int64_t", thr, "thr", f"log thresholds of {q['node']}, one row per fractional length {fs}")
    zn = consts.array("int64_t", [tables[f][1] for f in fs], "thrz")
    row = {f: i for i, f in enumerate(fs)}
    sel = consts.array("uint8_t", [row[int(f)] for f in src.frac], "thrrow")
    return (f"({out.ctype})mxqn_logq({v}, {name} + {sel}[{idx}] * {m1}, {m1}, {zn}[{sel}[{idx}]], {signed})")


def quant_float_code(consts: Consts, out: Val, x: str) -> str:
    q = out.quant
    if q["kind"] == "fixed":
        if not -126 <= q["frac"] <= 127:  # 2^frac is no float32: the double version
            return f"({out.ctype})mxqn_fixq_d({x}, {hexf(q['frac'])}, {q['lo']}, {q['hi']})"
        return f"({out.ctype})mxqn_fixq_f({x}, {hexf(q['frac'])}f, {q['lo']}, {q['hi']})"
    t = out.table
    mids = consts.array("float", t.mids, "mids", f"log thresholds of {q['node']} (float32 midpoints)")
    zero = repr(float(t.zero_below))
    return f"({out.ctype})mxqn_logq_f({x}, {mids}, {len(t.mids)}, {zero}f, {int(q['signed'])})"


def debug_codes(v: Val, records: list) -> str:
    if v.quant is None:
        return ""
    records.append((v.name, 0, v.ctype, v.numel))
    return (f"#ifdef MXQN_DEBUG\n    mxqn_debug_tensor({c_string(v.name)}, 0, {TYPE_CODE[v.ctype]}, "
            f"(void *){ptr(v)}, {v.numel}L);\n#endif\n")
