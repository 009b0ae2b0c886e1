"""C export: the fast layer kernel for fixed-point inputs with int32 sums (the common case).

Output-stationary, as CMSIS-NN's: two output positions at a time are gathered into two int16
columns of the layer's fan-in (``im2col``, zeros for padding, the length rounded up to even),
and each pair of output channels (int16 weight rows, padded alike) is multiplied with both
columns: four int32 dot products, two MACs per step. On a Cortex-M with the DSP extension
(``__ARM_FEATURE_DSP``: M4, M7, M33) a step is one ``SMLAD`` per pair of MACs, reading a pair
of int16 values per 32-bit load; elsewhere the same sums in plain C, which GCC vectorizes
(``pmaddwd`` on x86). Integer sums are exact and bounded below 2^31 by the planner, so the
result is the weight-stationary kernel's, bit for bit.

Taken when the input is fixed-point codes that fit int16, the weights are stored as int8 or
int16 (not packed int4: those keep their flash saving and the generic kernel), and the planner
chose int32 sums. The weights are stored as int16 rows (twice the flash of int8).
"""

from __future__ import annotations

from typing import List

import numpy as np

from .c_kernels import Consts, comment, ptr
from .c_ops import Step, Val

#: runtime helper: four int32 dot products of two int16 rows with two int16 columns
DOT_2X2 = r"""
/* ---------------------------------------------------------------- fast int16 dot products */
#if defined(__ARM_FEATURE_DSP) && !defined(MXQN_NO_DSP)
#include <arm_acle.h>
#include <string.h>
/* s[0] = w0.c0, s[1] = w0.c1, s[2] = w1.c0, s[3] = w1.c1 over n2 pairs: one SMLAD per 2 MACs */
static inline void mxqn_dot_2x2(const int16_t *w0, const int16_t *w1, const int16_t *c0, const int16_t *c1,
                                long n2, int32_t *s)
{
    int32_t s00 = 0, s01 = 0, s10 = 0, s11 = 0;
    uint32_t a, b, x, y;
    long i;
#define MXQN_SMLAD4(i)                  \
    memcpy(&a, w0 + 2 * (i), 4);        \
    memcpy(&b, w1 + 2 * (i), 4);        \
    memcpy(&x, c0 + 2 * (i), 4);        \
    memcpy(&y, c1 + 2 * (i), 4);        \
    s00 = __smlad(a, x, s00);           \
    s01 = __smlad(a, y, s01);           \
    s10 = __smlad(b, x, s10);           \
    s11 = __smlad(b, y, s11);
    for (i = 0; i + 1 < n2; i += 2) { /* unrolled twice: 16 MACs per 19 instructions */
        MXQN_SMLAD4(i)
        MXQN_SMLAD4(i + 1)
    }
    if (i < n2) {
        MXQN_SMLAD4(i)
    }
#undef MXQN_SMLAD4
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
    """Bytes of the two int16 columns (none for a depthwise layer)."""
    return 0 if is_depthwise(p) else 2 * 2 * (p["K"] + (p["K"] & 1))


def is_depthwise(p: dict) -> bool:
    c = p.get("conv")
    return c is not None and c["G"] == c["C"] == p["O"] and c["G"] > 1


def _depthwise(consts: Consts, s: Step, fname: str, epi: str, narrow: bool) -> str:
    """Depthwise conv (one filter per channel): output-stationary, the taps straight from the
    input plane (no im2col: each input element meets only its channel's few taps), the
    window's weights held in locals, no bounds checks where the window is inside."""
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    c = p["conv"]
    O, K = p["O"], p["K"]
    H, W, OH, OW, KH, KW = c["H"], c["W"], c["OH"], c["OW"], c["KH"], c["KW"]
    wname = consts.array("int16_t", p["w"], "w16", f"{p['layer']}: {p['wbits']}-bit depthwise weights [{O}][{K}]")
    taps = [(ky, kx) for ky in range(KH) for kx in range(KW)]
    if len(taps) <= 25:  # unrolled: the channel's weights in locals, one load and one MAC per tap
        wl = [f"        const int32_t w{t} = wo[{t}];" for t in range(len(taps))]
        inside = ["                    sum = " + " + ".join(
            f"w{t} * xr[{ky * c['DH'] * W + kx * c['DW']}]" for t, (ky, kx) in enumerate(taps)) + ";"]
    else:
        wl = []
        inside = [f"                    for (ky = 0; ky < {KH}; ky++)",
                  f"                        for (kx = 0; kx < {KW}; kx++)",
                  f"                            sum += (int32_t)wo[ky * {KW} + kx] * xr[(long)ky * {c['DH'] * W} + kx * {c['DW']}];"]
    return "\n".join([
        f"/* layer '{comment(p['layer'])}' (depthwise, output-stationary): fixed input {x.ctype}, "
        f"{p['wbits']}-bit weights, int32 sums, output '{comment(y.name)}' */",
        f"static MXQN_LAYER void {fname}(void)", "{",
        f"    const {x.ctype} *x = {ptr(x, True)};",
        f"    {y.ctype} *y = {ptr(y)};",
        f"    {'int32_t' if narrow else 'int64_t'} v;", "    int o, oy, ox, ky, kx;", "    long oi;",
        f"    for (o = 0; o < {O}; o++) {{",
        f"        const int16_t *wo = {wname} + (long)o * {K}L;",
        f"        const {x.ctype} *xc = x + (long)o * {H * W}L;"] + wl + [
        f"        for (oy = 0; oy < {OH}; oy++) {{",
        f"            const int iy0 = oy * {c['SH']} - {c['PT']};",
        f"            for (ox = 0; ox < {OW}; ox++) {{",
        f"                const int ix0 = ox * {c['SW']} - {c['PL']};",
        "                int32_t sum = 0;",
        f"                if (iy0 >= 0 && iy0 + {(KH - 1) * c['DH']} < {H} && ix0 >= 0 && ix0 + {(KW - 1) * c['DW']} < {W}) {{",
        f"                    const {x.ctype} *xr = xc + (long)iy0 * {W} + ix0;"] + inside + [
        "                } else {",
        f"                    for (ky = 0; ky < {KH}; ky++) {{",
        f"                        const int iy = iy0 + ky * {c['DH']};",
        f"                        if (iy < 0 || iy >= {H}) continue;",
        f"                        for (kx = 0; kx < {KW}; kx++) {{",
        f"                            const int ix = ix0 + kx * {c['DW']};",
        f"                            if (ix >= 0 && ix < {W}) sum += (int32_t)wo[ky * {KW} + kx] * xc[(long)iy * {W} + ix];",
        "                        }", "                    }", "                }",
        f"                oi = (long)o * {OH * OW}L + (long)oy * {OW} + ox;",
        "    " + epi.replace("\n", "\n    "), "            }", "        }", "    }"])


def emit_fast_layer(consts: Consts, s: Step, fname: str, epilogue: List[str], col_offset: int) -> str:
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    O, K = p["O"], p["K"]
    KP = K + (K & 1)
    if is_depthwise(p):
        narrow = p["acc"].bound < 2 ** 31
        if narrow:
            epilogue = [line.replace("v = (int64_t)sum;", "v = sum;").replace("mxqn_fixq(", "mxqn_fixq32(")
                        for line in epilogue]
        return _depthwise(consts, s, fname, "\n".join("                " + line for line in epilogue), narrow)
    w = np.zeros((O, KP), np.int64)
    w[:, :K] = p["w"]
    wname = consts.array("int16_t", w, "w16", f"{p['layer']}: {p['wbits']}-bit weights as int16 [{O}][{KP}]")
    conv = p.get("conv")
    if conv is not None:
        G = conv["G"]
        CG, OG = conv["C"] // G, O // G
        H, W, OH, OW = conv["H"], conv["W"], conv["OH"], conv["OW"]
        npos = OH * OW
        fill = [f"        /* column j: the fan-in of output position p + j of group g (zeros outside) */",
                "        for (j = 0; j < 2; j++) {",
                "            int16_t *cj = col + j * %dL;" % KP,
                "            const long pp = p + j < %dL ? p + j : p;" % npos,
                f"            const int oy = (int)(pp / {OW}), ox = (int)(pp % {OW});",
                f"            const int iy0 = oy * {conv['SH']} - {conv['PT']}, ix0 = ox * {conv['SW']} - {conv['PL']};",
                "            long e = 0;",
                f"            if (iy0 >= 0 && iy0 + {(conv['KH'] - 1) * conv['DH']} < {H} && ix0 >= 0 && "
                f"ix0 + {(conv['KW'] - 1) * conv['DW']} < {W}) {{ /* the window is inside: no checks */",
                f"                for (ci = 0; ci < {CG}; ci++)",
                f"                    for (ky = 0; ky < {conv['KH']}; ky++) {{",
                f"                        const {x.ctype} *xr = x + ((long)g * {CG} + ci) * {H * W}L + "
                f"(long)(iy0 + ky * {conv['DH']}) * {W} + ix0;",
                f"                        for (kx = 0; kx < {conv['KW']}; kx++) cj[e++] = (int16_t)xr[kx * {conv['DW']}];",
                "                    }",
                "            } else",
                f"            for (ci = 0; ci < {CG}; ci++) {{",
                f"                const {x.ctype} *xc = x + ((long)g * {CG} + ci) * {H * W}L;",
                f"                for (ky = 0; ky < {conv['KH']}; ky++) {{",
                f"                    const int iy = iy0 + ky * {conv['DH']};",
                f"                    for (kx = 0; kx < {conv['KW']}; kx++, e++) {{",
                f"                        const int ix = ix0 + kx * {conv['DW']};",
                f"                        cj[e] = (iy >= 0 && iy < {H} && ix >= 0 && ix < {W}) ? "
                f"(int16_t)xc[(long)iy * {W} + ix] : 0;",
                "                    }", "                }", "            }",
                f"            for (; e < {KP}L; e++) cj[e] = 0;", "        }"]
        groups, per_group = G, OG
        out_index = f"(long)o * {npos}L + pp"
        decl = ["    int ci, ky, kx, g;"]
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
        out_index = f"pp * {O}L + o"
        decl = ["    int g;"]
    narrow = p["acc"].bound < 2 ** 31  # sum, bias and every value after them fit int32
    if narrow:
        epilogue = [line.replace("v = (int64_t)sum;", "v = sum;").replace("mxqn_fixq(", "mxqn_fixq32(")
                    for line in epilogue]
    epi = "\n".join("                " + line for line in epilogue)
    body = [f"/* layer '{comment(p['layer'])}' (int16 dot products): fixed input {x.ctype}, {p['wbits']}-bit "
            f"weights, int32 sums, output '{comment(y.name)}' */",
            f"static MXQN_LAYER void {fname}(void)", "{",
            f"    const {x.ctype} *x = {ptr(x, True)};",
            f"    {y.ctype} *y = {ptr(y)};",
            f"    int16_t *col = (int16_t *)(mxqn_arena + {col_offset});",
            "    int32_t s4[4];", f"    {'int32_t' if narrow else 'int64_t'} v;", "    int o, ob, j, t;",
            "    long p, oi;"] + decl + [
            f"    for (g = 0; g < {groups}; g++)",
            f"    for (p = 0; p < {npos}L; p += 2) {{"] + fill + [
            f"        for (ob = g * {per_group}; ob < (g + 1) * {per_group}; ob += 2) {{",
            f"            const int16_t *w0 = {wname} + (long)ob * {KP}L;",
            f"            const int16_t *w1 = ob + 1 < (g + 1) * {per_group} ? w0 + {KP}L : w0;",
            f"            mxqn_dot_2x2(w0, w1, col, col + {KP}L, {KP // 2}L, s4);",
            "            for (t = 0; t < 4; t++) {",
            "                const long pp = p + (t & 1);",
            "                const int32_t sum = s4[t];",
            "                o = ob + (t >> 1);",
            f"                if (pp >= {npos}L || o >= (g + 1) * {per_group}) continue;",
            f"                oi = {out_index};",
            epi, "            }", "        }", "    }"]
    return "\n".join(body)
