"""C export: the fast layer kernel for fixed-point inputs with int32 sums (the common case).

Output-stationary, as CMSIS-NN's: two output positions at a time are gathered into two int16
columns of the layer's fan-in (``im2col``, zeros for padding, the length rounded up to even),
and each pair of output channels (int16 weight rows, padded alike) is multiplied with both
columns: four int32 dot products, two MACs per step. On a Cortex-M with the DSP extension
(``__ARM_FEATURE_DSP``: M4, M7, M33) a step is one ``SMLAD`` per pair of MACs, reading a pair
of int16 values per 32-bit load (four per ``LDRD`` under GCC/clang: the rows and columns are
4-byte aligned); elsewhere the same sums in plain C, which GCC vectorizes (``pmaddwd`` on x86,
``vpmaddwd`` with ``-march=native`` on AVX2). A full 2x2 block's four outputs are requantized
without a loop (:mod:`mxqn_onnx.integer.c_requant` where the epilogue allows); a 1x1 stride-1
conv's column is the input's channel vector; depthwise layers have their own kernel
(:mod:`mxqn_onnx.integer.c_depthwise`). Integer sums are exact and bounded below 2^31 by the planner, so the
result is the weight-stationary kernel's, bit for bit.

1x1 convs with few input channels take a row kernel instead: on x86 an SSE2 ``pmaddwd`` kernel
on pairs of channels interleaved per position (:func:`_pointwise_sse2`, ``MXQN_SSE2``); under
``-DMXQN_NO_SIMD`` with AVX2 a plain C loop that GCC vectorizes (:func:`_pointwise_rows`).

Taken when the input is fixed-point codes that fit int16, the weights are stored as int8 or
int16 (not packed int4: those keep their flash saving and the generic kernel), and the planner
chose int32 sums. The weights are stored as int16 rows (twice the flash of int8).
"""

from __future__ import annotations

import re
from typing import Callable, List

import numpy as np

from .c_depthwise import depthwise_scratch, emit_depthwise
from .c_kernels import Consts, comment, ptr
from .c_ops import Step, Val
from .c_requant import fast_requant

#: runtime helper: four int32 dot products of two int16 rows with two int16 columns
DOT_2X2 = r"""
/* ---------------------------------------------------------------- fast int16 dot products */
#if defined(__ARM_FEATURE_DSP) && !defined(MXQN_NO_DSP)
#include <arm_acle.h>
#include <string.h>
#if defined(__GNUC__) && !defined(MXQN_NO_LDRD)
/* two words (four int16) with one LDRD, p += 4 values; p is 4-byte aligned (rows and columns
 * of even length in 4-byte-aligned arrays). GCC does not pair the loads itself when tuning for
 * the M4. The memory operand tells the compiler what the instruction reads. */
#define MXQN_LD2(p, lo, hi) \
    __asm__("ldrd %0, %1, [%2], #8" : "=&r"(lo), "=&r"(hi), "+r"(p) : "m"(*(const char(*)[8])(const void *)(p)))
#else
#define MXQN_LD2(p, lo, hi) do { memcpy(&lo, p, 4); memcpy(&hi, p + 2, 4); p += 4; } while (0)
#endif
/* s[0] = w0.c0, s[1] = w0.c1, s[2] = w1.c0, s[3] = w1.c1 over n2 pairs: one SMLAD per 2 MACs */
static inline void mxqn_dot_2x2(const int16_t *w0, const int16_t *w1, const int16_t *c0, const int16_t *c1,
                                long n2, int32_t *s)
{
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    uint32_t a, b, x, y, a2, b2, x2, y2;
    long i;
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#pragma GCC unroll 4
#endif
    for (i = 0; i + 1 < n2; i += 2) { /* 16 MACs per 4 loads and 8 SMLADs (unrolled: no loop count between) */
        MXQN_LD2(c0, x, x2);
        MXQN_LD2(c1, y, y2);
        MXQN_LD2(w0, a, a2);
        s00 = __smlad(a, x, s00);
        s01 = __smlad(a, y, s01);
        s00 = __smlad(a2, x2, s00);
        s01 = __smlad(a2, y2, s01);
        MXQN_LD2(w1, b, b2);
        s10 = __smlad(b, x, s10);
        s11 = __smlad(b, y, s11);
        s10 = __smlad(b2, x2, s10);
        s11 = __smlad(b2, y2, s11);
    }
    if (i < n2) {
        memcpy(&a, w0, 4);
        memcpy(&b, w1, 4);
        memcpy(&x, c0, 4);
        memcpy(&y, c1, 4);
        s00 = __smlad(a, x, s00);
        s01 = __smlad(a, y, s01);
        s10 = __smlad(b, x, s10);
        s11 = __smlad(b, y, s11);
    }
    s[0] = s00; s[1] = s01; s[2] = s10; s[3] = s11;
}
#else
static inline void mxqn_dot_2x2(const int16_t *w0, const int16_t *w1, const int16_t *c0, const int16_t *c1,
                                long n2, int32_t *s)
{
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    long i;
    for (i = 0; i < 2 * n2; i++) {
        s00 += (int32_t)w0[i] * c0[i];
        s01 += (int32_t)w0[i] * c1[i];
        s10 += (int32_t)w1[i] * c0[i];
        s11 += (int32_t)w1[i] * c1[i];
    }
    s[0] = s00; s[1] = s01; s[2] = s10; s[3] = s11;
}
#endif
"""


def fast_ok(s: Step) -> bool:
    """The layer can run on the int16 dot-product kernel."""
    p = s.p
    x: Val = s.ins[0]
    if x.kind != "int" or x.quant is None or p["sum_type"] != "int32_t" or p["container"] == "int4":
        return False
    if "convT" in p:
        return False
    q = x.quant
    return max(-q["lo"], q["hi"]) <= 32767 and int(np.abs(p["w"]).max(initial=0)) <= 32767


def fast_scratch(p: dict) -> int:
    """Bytes of the two int16 columns, or of a depthwise layer's padded plane."""
    return depthwise_scratch(p) if is_depthwise(p) else 2 * 2 * (p["K"] + (p["K"] & 1))


def is_depthwise(p: dict) -> bool:
    c = p.get("conv")
    return c is not None and c["G"] == c["C"] == p["O"] and c["G"] > 1


def _gather(x: Val, p: dict, KP: int) -> List[str]:
    """C filling column ``cj`` with the fan-in of output position ``pp`` of group ``g``."""
    conv = p["conv"]
    G = conv["G"]
    CG = conv["C"] // G
    H, W, OW = conv["H"], conv["W"], conv["OW"]
    KH, KW, SH, SW, DH, DW, PT, PL = (conv[k] for k in ("KH", "KW", "SH", "SW", "DH", "DW", "PT", "PL"))
    if KH == KW == 1 and PT == PL == 0 and SH == SW == 1 and conv["OH"] == H and OW == W:
        # 1x1, stride 1: the column is the input's channel vector at the position
        return [f"            const {x.ctype} *xp = x + (long)g * {CG * H * W}L + pp; /* 1x1: the channel vector */",
                f"            for (e = 0; e < {CG}L; e++) cj[e] = (int16_t)xp[e * {H * W}L];"]
    if KW <= 8:  # the window's row copied with the column offsets as constants
        row = " ".join(f"cj[e + {kx}] = (int16_t)xr[{kx * DW}];" for kx in range(KW))
        inner = [f"                for (ci = 0; ci < {CG}; ci++)",
                 f"                    for (ky = 0; ky < {KH}; ky++, e += {KW}) {{",
                 f"                        const {x.ctype} *xr = x + ((long)g * {CG} + ci) * {H * W}L + "
                 f"(long)(iy0 + ky * {DH}) * {W} + ix0;",
                 f"                        {row}",
                 "                    }"]
    else:
        inner = [f"                for (ci = 0; ci < {CG}; ci++)",
                 f"                    for (ky = 0; ky < {KH}; ky++) {{",
                 f"                        const {x.ctype} *xr = x + ((long)g * {CG} + ci) * {H * W}L + "
                 f"(long)(iy0 + ky * {DH}) * {W} + ix0;",
                 f"                        for (kx = 0; kx < {KW}; kx++) cj[e++] = (int16_t)xr[kx * {DW}];",
                 "                    }"]
    return [f"            const int oy = (int)(pp / {OW}), ox = (int)(pp % {OW});",
            f"            const int iy0 = oy * {SH} - {PT}, ix0 = ox * {SW} - {PL};",
            f"            e = 0;",
            f"            if (iy0 >= 0 && iy0 + {(KH - 1) * DH} < {H} && ix0 >= 0 && "
            f"ix0 + {(KW - 1) * DW} < {W}) {{ /* the window is inside: no checks */"] + inner + [
            "            } else",
            f"            for (ci = 0; ci < {CG}; ci++) {{",
            f"                const {x.ctype} *xc = x + ((long)g * {CG} + ci) * {H * W}L;",
            f"                for (ky = 0; ky < {KH}; ky++) {{",
            f"                    const int iy = iy0 + ky * {DH};",
            f"                    for (kx = 0; kx < {KW}; kx++, e++) {{",
            f"                        const int ix = ix0 + kx * {DW};",
            f"                        cj[e] = (iy >= 0 && iy < {H} && ix >= 0 && ix < {W}) ? "
            f"(int16_t)xc[(long)iy * {W} + ix] : 0;",
            "                    }", "                }", "            }"]


def emit_fast_layer(consts: Consts, s: Step, fname: str, generic_epilogue: Callable[[], List[str]],
                    col_offset: int) -> str:
    """The layer's C function; ``generic_epilogue()`` gives the general requantization's
    statements, asked for only when :func:`fast_requant` cannot express the layer's."""
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    O, K = p["O"], p["K"]
    KP = K + (K & 1)
    narrow = p["acc"].bound < 2 ** 31  # sum, bias and every value after them fit int32
    rq = fast_requant(consts, s)
    epilogue: List[str] = []
    if rq is None:
        epilogue = generic_epilogue()
        if narrow:
            epilogue = [line.replace("v = (int64_t)sum;", "v = sum;").replace("mxqn_fixq(", "mxqn_fixq32(")
                        for line in epilogue]
    if is_depthwise(p):
        return emit_depthwise(consts, s, fname, epilogue, rq, narrow, col_offset)
    if rq is not None and pointwise_rows(p):
        return "\n".join(["#if MXQN_SSE2", _pointwise_sse2(consts, s, fname, rq), "#elif MXQN_ROW_1X1",
                          _pointwise_rows(consts, s, fname, rq), "#else",
                          _dot_layer(consts, s, fname, epilogue, rq, narrow, col_offset), "#endif"])
    return _dot_layer(consts, s, fname, epilogue, rq, narrow, col_offset)


#: 1x1 convs with at most this many input channels take the row kernel on hosts with vectors
#: (a 2x2 block's dot products of 16-24 pairs cost more in gathering and summing than in MACs)
ROW_MAX_K = 32
#: positions per block of the row kernel's int32 sums
ROW_BLOCK = 64


def pointwise_rows(p: dict) -> bool:
    c = p.get("conv")
    return (c is not None and c["G"] == 1 and c["KH"] == c["KW"] == 1 and c["SH"] == c["SW"] == 1
            and c["PT"] == c["PL"] == 0 and c["OH"] == c["H"] and c["OW"] == c["W"] and p["K"] <= ROW_MAX_K)


def _pointwise_rows(consts: Consts, s: Step, fname: str, rq) -> str:
    """1x1 conv with few input channels, row kernel: for each output channel, its weights in
    locals, one loop along a block of positions summing the K input planes' codes
    (``acc[i] = w0 * x0[i] + w1 * x1[i] + ...``, int32), then one loop requantizing the block:
    loops that GCC vectorizes at -O2."""
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    O, K = p["O"], p["K"]
    HW = p["conv"]["H"] * p["conv"]["W"]
    B = min(HW, ROW_BLOCK)
    KP = K + (K & 1)  # the dot-product kernel's rows (one array for both kernels)
    w = np.zeros((O, KP), np.int64)
    w[:, :K] = p["w"]
    wname = consts.array("int16_t", w, "w16", f"{p['layer']}: {p['wbits']}-bit weights as int16 [{O}][{KP}]",
                         align=4)
    body = [f"/* layer '{comment(p['layer'])}' (1x1, row kernel, {K} input channels): fixed input {x.ctype}, "
            f"{p['wbits']}-bit weights, int32 sums, output '{comment(y.name)}' */",
            f"static MXQN_LAYER void {fname}(void)", "{",
            f"    const {x.ctype} *x = {ptr(x, True)};",
            f"    {y.ctype} *y = {ptr(y)};",
            f"    int32_t acc[{B}];",
            "    int o, i;", "    long p0;",
            f"    for (o = 0; o < {O}; o++) {{",
            f"        const int16_t *wo = {wname} + (long)o * {KP}L;",
            f"        {y.ctype} *yo = y + (long)o * {HW}L;"]
    body += [f"        const int32_t w{c} = wo[{c}];" for c in range(K)]
    body += ["        " + line for line in rq.hoist()]
    body += [f"        for (p0 = 0; p0 < {HW}L; p0 += {B}) {{",
             f"            const int n = {HW}L - p0 < {B} ? (int)({HW}L - p0) : {B};",
             f"            const {x.ctype} *restrict xp = x + p0;",
             f"            {y.ctype} *restrict yp = yo + p0;",
             "            for (i = 0; i < n; i++)",
             "                acc[i] = " + " + ".join(f"w{c} * xp[i + {c * HW}L]" for c in range(K)) + ";",
             "            for (i = 0; i < n; i++) {",
             "                " + rq.debug_hoisted("(long)o * %dL + p0 + i" % HW, "acc[i]"),
             f"                yp[i] = {rq.store_hoisted('acc[i]')};",
             "            }", "        }", "    }"]
    return "\n".join(body)


#: positions per block of the SSE2 1x1 kernel (its interleaved copy of the block's codes is on the stack)
SSE2_BLOCK = 128


def _w16_rows(consts: Consts, p: dict) -> str:
    """The int16 weight rows [O][K rounded up to even] (one array for every 1x1 kernel)."""
    O, K = p["O"], p["K"]
    w = np.zeros((O, K + (K & 1)), np.int64)
    w[:, :K] = p["w"]
    return consts.array("int16_t", w, "w16", f"{p['layer']}: {p['wbits']}-bit weights as int16 [{O}][{K + (K & 1)}]",
                        align=4)


def _pointwise_sse2(consts: Consts, s: Step, fname: str, rq) -> str:
    """1x1 conv with few input channels on x86 (``MXQN_SSE2``): for each block of positions,
    the input channels' codes are copied once into an int16 block with pairs of channels
    interleaved per position (``[x0[i], x1[i], x0[i+1], x1[i+1], ...]``); then for each output
    channel one ``pmaddwd`` multiplies 4 positions x 2 channels with the pair's weights (8 MACs
    into 4 int32 lanes, its operand read straight from the aligned block) and one ``paddd`` sums
    them, and a loop requantizes the block. Exact like the depthwise pairs: the weights are above
    -32768 (:func:`fast_ok`), a pair sum is below 2^31 in magnitude, the int32 lanes wrap like the
    planner-bounded sum. An odd last channel is paired with itself and weight 0 (the rows' pad)."""
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    O, K = p["O"], p["K"]
    HW = p["conv"]["H"] * p["conv"]["W"]
    KP = K + (K & 1)
    K2 = KP // 2
    B = min(-(-HW // 8) * 8, SSE2_BLOCK)
    wname = _w16_rows(consts, p)
    body = [f"/* layer '{comment(p['layer'])}' (1x1, SSE2 pmaddwd kernel, {K} input channels in pairs): fixed input "
            f"{x.ctype}, {p['wbits']}-bit weights, int32 sums, output '{comment(y.name)}' */",
            f"static MXQN_LAYER void {fname}(void)", "{",
            f"    const {x.ctype} *x = {ptr(x, True)};",
            f"    {y.ctype} *y = {ptr(y)};",
            f"    int16_t xs[{K2 * 2 * B}] __attribute__((aligned(16)));",
            f"    int32_t acc[{B}];",
            "    int o, i, n8;", "    long p0;",
            f"    for (p0 = 0; p0 < {HW}L; p0 += {B}) {{",
            f"        const int n = {HW}L - p0 < {B} ? (int)({HW}L - p0) : {B};",
            "        n8 = (n + 7) & ~7;"]
    for j in range(K2):
        b = 2 * j + 1 if 2 * j + 1 < K else 2 * j
        body += ["        {",
                 f"            const {x.ctype} *restrict xa = x + p0 + {2 * j * HW}L;",
                 f"            const {x.ctype} *restrict xb = x + p0 + {b * HW}L;",
                 f"            int16_t *restrict d = xs + {j * 2 * B};",
                 "            for (i = 0; i < n; i++) { d[2 * i] = (int16_t)xa[i]; d[2 * i + 1] = (int16_t)xb[i]; }",
                 "            for (; i < n8; i++) { d[2 * i] = 0; d[2 * i + 1] = 0; }",
                 "        }"]
    body += [f"        for (o = 0; o < {O}; o++) {{",
             f"            const int16_t *wo = {wname} + (long)o * {KP}L;",
             f"            {y.ctype} *restrict yp = y + (long)o * {HW}L + p0;"]
    body += [f"            const __m128i wp{j} = _mm_set1_epi32((int32_t)((uint32_t)(uint16_t)wo[{2 * j}] | "
             f"(uint32_t)(uint16_t)wo[{2 * j + 1}] << 16));" for j in range(K2)]
    body += ["            " + line for line in rq.hoist()]
    body += ["            for (i = 0; i < n8; i += 8) {",
             "                __m128i lo = _mm_setzero_si128(), hi = _mm_setzero_si128();"]
    for j in range(K2):
        body += [f"                lo = _mm_add_epi32(lo, _mm_madd_epi16(_mm_load_si128((const __m128i *)(xs + {j * 2 * B} + 2 * i)), wp{j}));",
                 f"                hi = _mm_add_epi32(hi, _mm_madd_epi16(_mm_load_si128((const __m128i *)(xs + {j * 2 * B + 8} + 2 * i)), wp{j}));"]
    body += ["                _mm_storeu_si128((__m128i *)(acc + i), lo);",
             "                _mm_storeu_si128((__m128i *)(acc + i + 4), hi);", "            }",
             "            for (i = 0; i < n; i++) {",
             "                " + rq.debug_hoisted("(long)o * %dL + p0 + i" % HW, "acc[i]"),
             f"                yp[i] = {rq.store_hoisted('acc[i]')};",
             "            }", "        }", "    }"]
    return "\n".join(body)


def _dot_layer(consts: Consts, s: Step, fname: str, epilogue: List[str], rq, narrow: bool, col_offset: int) -> str:
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    O, K = p["O"], p["K"]
    KP = K + (K & 1)
    w = np.zeros((O, KP), np.int64)
    w[:, :K] = p["w"]
    wname = consts.array("int16_t", w, "w16", f"{p['layer']}: {p['wbits']}-bit weights as int16 [{O}][{KP}]",
                         align=4)
    conv = p.get("conv")
    if conv is not None:
        G = conv["G"]
        OG = O // G
        npos = conv["OH"] * conv["OW"]
        fill = ["        /* column j: the fan-in of output position p + j of group g (zeros outside) */",
                "        for (j = 0; j < 2; j++) {",
                "            int16_t *cj = col + j * %dL;" % KP,
                "            const long pp = p + j < %dL ? p + j : p;" % npos,
                "            long e;"] + _gather(x, p, KP) + [
                f"            for (e = {conv['C'] // G * conv['KH'] * conv['KW']}L; e < {KP}L; e++) cj[e] = 0;",
                "        }"]
        groups, per_group = G, OG
        index = lambda o, pp: f"(long)({o}) * {npos}L + {pp}"  # noqa: E731
        used = "\n".join(fill)
        decl = ["    int " + ", ".join([v for v in ("ci", "ky", "kx") if re.search(rf"\b{v}\b", used)] + ["g"]) + ";"]
    else:
        npos = p["rows"]
        fill = ["        for (j = 0; j < 2; j++) {",
                "            int16_t *cj = col + j * %dL;" % KP,
                "            const long pp = p + j < %dL ? p + j : p;" % npos,
                f"            const {x.ctype} *xr = x + pp * {K}L;",
                "            long e;",
                f"            for (e = 0; e < {K}L; e++) cj[e] = (int16_t)xr[e];",
                f"            for (; e < {KP}L; e++) cj[e] = 0;", "        }"]
        groups, per_group = 1, O
        index = lambda o, pp: f"({pp}) * {O}L + {o}"  # noqa: E731
        decl = ["    int g;"]

    def out(t: int, o: str, pp: str) -> List[str]:
        """The stored value of sum s4[t] for channel o, position pp."""
        if rq is not None:
            return [f"o = {o};", rq.debug(index("o", pp), f"s4[{t}]"), f"y[{index('o', pp)}] = {rq.store(f's4[{t}]')};"]
        return ["{", f"    const int32_t sum = s4[{t}];", f"    o = {o};", f"    oi = {index('o', pp)};"] + \
            ["    " + line for line in epilogue] + ["}"]

    full = [line for t in range(4) for line in out(t, f"ob + {t >> 1}", f"p + {t & 1}")]
    tail = out(0, "ob + (t >> 1)", "pp")
    body = [f"/* layer '{comment(p['layer'])}' (int16 dot products): fixed input {x.ctype}, {p['wbits']}-bit "
            f"weights, int32 sums, output '{comment(y.name)}' */",
            f"static MXQN_LAYER void {fname}(void)", "{",
            f"    const {x.ctype} *x = {ptr(x, True)};",
            f"    {y.ctype} *y = {ptr(y)};",
            f"    int16_t *col = (int16_t *)(mxqn_arena + {col_offset});",
            "    int32_t s4[4];", "    int o, ob, j, t;", "    long p;"] + \
        ([f"    {'int32_t' if narrow else 'int64_t'} v;", "    long oi;"] if rq is None else []) + decl + [
            f"    for (g = 0; g < {groups}; g++)",
            f"    for (p = 0; p < {npos}L; p += 2) {{"] + fill + [
            f"        for (ob = g * {per_group}; ob < (g + 1) * {per_group}; ob += 2) {{",
            f"            const int16_t *w0 = {wname} + (long)ob * {KP}L;",
            f"            const int16_t *w1 = ob + 1 < (g + 1) * {per_group} ? w0 + {KP}L : w0;",
            f"            mxqn_dot_2x2(w0, w1, col, col + {KP}L, {KP // 2}L, s4);",
            f"            if (p + 1 < {npos}L && ob + 1 < (g + 1) * {per_group}) {{ /* a full 2x2 block */"] + \
        ["                " + line for line in full] + [
            "                continue;", "            }",
            "            for (t = 0; t < 4; t++) {",
            "                const long pp = p + (t & 1);",
            f"                if (pp >= {npos}L || ob + (t >> 1) >= (g + 1) * {per_group}) continue;"] + \
        ["                " + line.replace("s4[0]", "s4[t]") for line in tail] + [
            "            }", "        }", "    }"]
    return "\n".join(body)
