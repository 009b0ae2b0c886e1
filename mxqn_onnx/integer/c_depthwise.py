"""C export: the depthwise convolution kernel (one 2-d filter per channel, int32 sums).

Output-stationary with the channel outermost: the channel's taps and its requantization
constants are held in locals, and each output is a short sum read straight from the input
plane (no im2col: an input element meets only its own channel's few taps). The bounds checks
cost more than the 9 MACs of a 3x3 window, so each row is split where the planner's shapes say
the windows are inside the plane: the rows and columns whose window touches the padding take
the checked loop, the interior takes an unrolled sum without checks, two neighbouring outputs
per step (their windows overlap: at stride 1 a 3x3 pair reads 12 inputs instead of 18).
The sums are the executor's exact integers (the order of an integer sum does not matter).
On x86 (``MXQN_SSE2``: SSE2, every x86-64; ``-DMXQN_NO_SIMD`` keeps the portable C) the row
kernel's sums are written with SSE2 intrinsics: the taps in pairs, one ``pmaddwd`` per pair and
4 outputs (:func:`_sse2_row`), since GCC uses ``pmaddwd`` only in reductions and otherwise needs
``pmullw``, ``pmulhw`` and two unpacks per 8 products.
"""

from __future__ import annotations

from typing import List, Optional

from .c_kernels import Consts, comment, ptr
from .c_ops import Step, Val
from .c_requant import FastRequant


def _first_inside(pad: int, stride: int) -> int:
    """First output whose window starts at input >= 0."""
    return -(-pad // stride)


def _end_inside(pad: int, stride: int, span: int, n: int, out: int) -> int:
    """One past the last output whose window ends inside an input of length n (span: last tap's offset)."""
    last = n - 1 - span + pad  # out * stride <= last
    return 0 if last < 0 else min(out, last // stride + 1)


def _tap_sum(dst: str, xr: str, c: dict, row: int) -> List[str]:
    """C lines summing one window's taps into int32 ``dst``, reading the plane at ``xr``
    (``row`` values per plane row): written out up to 5x5, a loop over ``wo`` beyond."""
    KH, KW, DH, DW = c["KH"], c["KW"], c["DH"], c["DW"]
    if KH * KW <= 25:
        return [f"const int32_t {dst} = " + " + ".join(
            f"w{ky * KW + kx} * {xr}[{ky * DH * row + kx * DW}]" for ky in range(KH) for kx in range(KW)) + ";"]
    return [f"int32_t {dst} = 0;",
            f"for (ky = 0; ky < {KH}; ky++)",
            f"    for (kx = 0; kx < {KW}; kx++)",
            f"        {dst} += (int32_t)wo[ky * {KW} + kx] * {xr}[(long)ky * {DH * row} + kx * {DW}];"]


def _store(sum_expr: str, ox: str, c: dict, epilogue: List[str], rq: Optional[FastRequant]) -> List[str]:
    """C lines putting one output's sum through the layer's epilogue (``yr`` row, or ``oi``)."""
    OH, OW = c["OH"], c["OW"]
    if rq is not None:
        return [rq.debug_hoisted(f"(long)o * {OH * OW}L + (long)oy * {OW} + {ox}", sum_expr),
                f"yr[{ox}] = {rq.store_hoisted(sum_expr)};"]
    return ["{", f"    const int32_t sum = {sum_expr};", f"    oi = (long)o * {OH * OW}L + (long)oy * {OW} + {ox};"] + \
        ["    " + line for line in epilogue] + ["}"]


def padded_plane(p: dict):
    """(rows, columns) of the zero-padded int16 copy of one channel's plane that every window
    fits in, or None when every window is inside the plane already (no padding to add)."""
    c = p["conv"]
    H, W, OH, OW = c["H"], c["W"], c["OH"], c["OW"]
    need_h = (OH - 1) * c["SH"] + (c["KH"] - 1) * c["DH"] + 1
    need_w = (OW - 1) * c["SW"] + (c["KW"] - 1) * c["DW"] + 1
    if c["PT"] == 0 and c["PL"] == 0 and need_h <= H and need_w <= W:
        return None
    return max(H + c["PT"], need_h), max(W + c["PL"], need_w)


def row_plane(p: dict):
    """(rows, row stride, phase length) of the row kernel's int16 plane: each padded row stored
    as its SW column phases (columns ph, ph + SW, ...), each phase L long, so that a tap of a
    strided window reads consecutive elements along the output row."""
    c = p["conv"]
    hw = padded_plane(p)
    HP, WP = (c["H"], c["W"]) if hw is None else hw
    L = -(-WP // c["SW"])
    return HP, c["SW"] * L, L


def depthwise_scratch(p: dict) -> int:
    """Bytes of the padded plane (the row kernel's phase-split plane on hosts with vectors)."""
    hw = padded_plane(p)
    HP, RS, _ = row_plane(p)
    return max(0 if hw is None else 2 * hw[0] * hw[1], 2 * HP * RS)


def _padded(consts: Consts, s: Step, fname: str, epilogue: List[str], rq: Optional[FastRequant], narrow: bool,
            pad_offset: int, wname: str) -> str:
    """Each channel's plane is copied into a zero-padded int16 plane (its zero border written
    once per call): then every window is inside, and every output is the unrolled sum without
    a bounds check (a 4x4 plane with padding 1 has 12 border outputs of 16)."""
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    c = p["conv"]
    O, K = p["O"], p["K"]
    H, W, OH, OW, KH, KW = c["H"], c["W"], c["OH"], c["OW"], c["KH"], c["KW"]
    SH, SW, DH, DW, PT, PL = c["SH"], c["SW"], c["DH"], c["DW"], c["PT"], c["PL"]
    HP, WP = padded_plane(p)
    taps = [(ky, kx) for ky in range(KH) for kx in range(KW)]
    unrolled = len(taps) <= 25

    def inside(dst: str, xr: str) -> List[str]:
        return _tap_sum(dst, xr, c, WP)

    def store(sum_expr: str, ox: str) -> List[str]:
        return _store(sum_expr, ox, c, epilogue, rq)

    ind = lambda lines, n: [" " * n + line for line in lines]  # noqa: E731
    body = [
        f"/* layer '{comment(p['layer'])}' (depthwise, output-stationary, on a zero-padded {HP}x{WP} int16 copy "
        f"of each plane): fixed input {x.ctype}, {p['wbits']}-bit weights, int32 sums, output '{comment(y.name)}' */",
        f"static MXQN_LAYER void {fname}(void)", "{",
        f"    const {x.ctype} *x = {ptr(x, True)};",
        f"    {y.ctype} *y = {ptr(y)};",
        f"    int16_t *pad = (int16_t *)(mxqn_arena + {pad_offset});"]
    if rq is None:
        body += [f"    {'int32_t' if narrow else 'int64_t'} v;", "    long oi;"]
    body += ["    int o, oy, ox, iy, ix;" + ("" if unrolled else " int ky, kx;"),
             f"    for (ix = 0; ix < {HP * WP}; ix++) pad[ix] = 0;",
             f"    for (o = 0; o < {O}; o++) {{",
             f"        const int16_t *wo = {wname} + (long)o * {K}L;",
             f"        const {x.ctype} *xc = x + (long)o * {H * W}L;"]
    if rq is not None:
        body += [f"        {y.ctype} *yo = y + (long)o * {OH * OW}L;"]
    body += [f"        const int32_t w{t} = wo[{t}];" for t in range(len(taps))] if unrolled else []
    body += ind(rq.hoist(), 8) if rq is not None else []
    body += [f"        for (iy = 0; iy < {H}; iy++)",
             f"            for (ix = 0; ix < {W}; ix++) pad[(iy + {PT}) * {WP} + {PL} + ix] = (int16_t)xc[(long)iy * {W} + ix];",
             f"        for (oy = 0; oy < {OH}; oy++) {{",
             f"            const int16_t *pr = pad + oy * {SH * WP};"]
    if rq is not None:
        body += [f"            {y.ctype} *yr = yo + (long)oy * {OW};"]
    if OW >= 2:
        body += [f"            for (ox = 0; ox + 1 < {OW}; ox += 2) {{", f"                const int16_t *xr = pr + ox * {SW};"]
        body += ind(inside("s0", "xr") + inside("s1", f"(xr + {SW})") + store("s0", "ox") + store("s1", "ox + 1"), 16)
        body += ["            }"]
    else:
        body += ["            ox = 0;"]
    body += [f"            for (; ox < {OW}; ox++) {{", f"                const int16_t *xr = pr + ox * {SW};"]
    body += ind(inside("s0", "xr") + store("s0", "ox"), 16)
    body += ["            }", "        }", "    }"]
    return "\n".join(body)


def _rows(s: Step, fname: str, rq: FastRequant, pad_offset: int, wname: str) -> str:
    """The row kernel (hosts with vector units): each output row is one loop over its outputs,
    the window's taps unrolled in its body (``sum = w0 * r0[ox] + w1 * r0[ox + 1] + ...``),
    reading int16 rows of a copy of the channel's plane (zero-padded, its columns split into the
    stride's phases so that every tap reads consecutive elements), int32 sums, requantized and
    stored in the same loop: a loop that GCC vectorizes at -O2 (restrict pointers, no branches)."""
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    c = p["conv"]
    O, K = p["O"], p["K"]
    H, W, OH, OW, KH, KW = c["H"], c["W"], c["OH"], c["OW"], c["KH"], c["KW"]
    SH, SW, DH, DW, PT, PL = c["SH"], c["SW"], c["DH"], c["DW"], c["PT"], c["PL"]
    HP, RS, L = row_plane(p)
    taps = [(ky, kx) for ky in range(KH) for kx in range(KW)]
    body = [
        f"/* layer '{comment(p['layer'])}' (depthwise, row kernel on a {HP}x{RS} int16 copy of each plane"
        f"{', columns split into ' + str(SW) + ' phases' if SW > 1 else ''}): fixed input {x.ctype}, "
        f"{p['wbits']}-bit weights, int32 sums, output '{comment(y.name)}' */",
        f"static MXQN_LAYER void {fname}(void)", "{",
        f"    const {x.ctype} *x = {ptr(x, True)};",
        f"    {y.ctype} *y = {ptr(y)};",
        f"    int16_t *pad = (int16_t *)(mxqn_arena + {pad_offset});",
        "    int o, oy, ox, iy;",
        f"    int32_t acc[{OW}];",
        f"    for (ox = 0; ox < {HP * RS}; ox++) pad[ox] = 0;",
        f"    for (o = 0; o < {O}; o++) {{",
        f"        const int16_t *wo = {wname} + (long)o * {K}L;",
        f"        const {x.ctype} *xc = x + (long)o * {H * W}L;",
        f"        {y.ctype} *yo = y + (long)o * {OH * OW}L;"]
    body += [f"        const int32_t w{t} = wo[{t}];" for t in range(len(taps))]
    body += ["#if MXQN_SSE2"] + [f"        const __m128i wp{j} = _mm_set1_epi32((int32_t)((uint32_t)(uint16_t)wo[{2 * j}]"
                                 + (f" | (uint32_t)(uint16_t)wo[{2 * j + 1}] << 16));" if 2 * j + 1 < len(taps) else "));")
                                 for j in range((len(taps) + 1) // 2 if OW >= 4 else 0)] + ["#endif"]
    body += ["        " + line for line in rq.hoist()]
    body += [f"        for (iy = 0; iy < {H}; iy++) {{",
             f"            int16_t *restrict pr = pad + (long)(iy + {PT}) * {RS};",
             f"            const {x.ctype} *restrict xr = xc + (long)iy * {W};"]
    for ph in range(SW):
        j0 = max(0, -(-(PL - ph) // SW))
        j1 = min(L, (W - 1 + PL - ph) // SW + 1)
        if j1 > j0:
            src = j0 * SW + ph - PL
            body += [f"            for (ox = 0; ox < {j1 - j0}; ox++) pr[{ph * L + j0} + ox] = (int16_t)xr[ox"
                     f"{' * ' + str(SW) if SW > 1 else ''} + {src}];"]
    body += ["        }", f"        for (oy = 0; oy < {OH}; oy++) {{"]
    body += [f"            const int16_t *restrict r{ky} = pad + (long)(oy * {SH} + {ky * DH}) * {RS};" for ky in range(KH)]
    body += [f"            {y.ctype} *restrict yr = yo + (long)oy * {OW};",
             f"            for (ox = 0; ox < {OW}; ox++)"]
    terms, reads = [], []
    for t, (ky, kx) in enumerate(taps):
        col = kx * DW
        terms.append(f"w{t} * r{ky}[ox + {(col % SW) * L + col // SW}]")
        reads.append(f"r{ky} + ox + {(col % SW) * L + col // SW}")
    scalar = "                acc[ox] = " + " + ".join(terms) + ";"
    body[-1:] = ["#if MXQN_SSE2"] + _sse2_row(reads, OW) + [f"            for (; ox < {OW}; ox++)", scalar, "#else",
                                                         body[-1], scalar, "#endif"]
    body += [
             f"            for (ox = 0; ox < {OW}; ox++) {{",
             "                " + rq.debug_hoisted(f"(long)o * {OH * OW}L + (long)oy * {OW} + ox", "acc[ox]"),
             f"                yr[ox] = {rq.store_hoisted('acc[ox]')};",
             "            }", "        }", "    }"]
    return "\n".join(body)


def _sse2_row(reads: List[str], OW: int) -> List[str]:
    """SSE2 body of the row kernel's sums (``MXQN_SSE2``): the taps in pairs, the two taps'
    values for the same outputs interleaved (``punpcklwd``/``punpckhwd``) and multiplied with the
    pair's weights by one ``pmaddwd``: 8 MACs into 4 int32 lanes per instruction, 8 outputs per
    step, then 4, then the scalar sum. An odd last tap is paired with itself and weight 0. Exact:
    the weights are above -32768 (:func:`~mxqn_onnx.integer.c_fast.fast_ok`), so a pair sum is at
    most 2 * 32767 * 32768 < 2^31 in magnitude, and the int32 lanes wrap like the planner-bounded
    int32 sum (below 2^31) they end at."""
    pairs = [(reads[i], reads[i + 1] if i + 1 < len(reads) else reads[i]) for i in range(0, len(reads), 2)]
    out = ["            ox = 0;"]
    if OW >= 8:
        out += [f"            for (; ox + 8 <= {OW}; ox += 8) {{",
                "                __m128i lo = _mm_setzero_si128(), hi = _mm_setzero_si128();"]
        for j, (a, b) in enumerate(pairs):
            out += ["                {",
                    f"                    const __m128i a = _mm_loadu_si128((const __m128i *)({a}));",
                    f"                    const __m128i b = _mm_loadu_si128((const __m128i *)({b}));",
                    f"                    lo = _mm_add_epi32(lo, _mm_madd_epi16(_mm_unpacklo_epi16(a, b), wp{j}));",
                    f"                    hi = _mm_add_epi32(hi, _mm_madd_epi16(_mm_unpackhi_epi16(a, b), wp{j}));",
                    "                }"]
        out += ["                _mm_storeu_si128((__m128i *)(acc + ox), lo);",
                "                _mm_storeu_si128((__m128i *)(acc + ox + 4), hi);", "            }"]
    if OW % 8 >= 4:
        out += [f"            if (ox + 4 <= {OW}) {{", "                __m128i lo = _mm_setzero_si128();"]
        for j, (a, b) in enumerate(pairs):
            out += [f"                lo = _mm_add_epi32(lo, _mm_madd_epi16(_mm_unpacklo_epi16("
                    f"_mm_loadl_epi64((const __m128i *)({a})), _mm_loadl_epi64((const __m128i *)({b}))), wp{j}));"]
        out += ["                _mm_storeu_si128((__m128i *)(acc + ox), lo);", "                ox += 4;", "            }"]
    return out


def emit_depthwise(consts: Consts, s: Step, fname: str, epilogue: List[str], rq: Optional[FastRequant],
                   narrow: bool, pad_offset: int) -> str:
    p = s.p
    if rq is not None and p["conv"]["KH"] * p["conv"]["KW"] <= 25:
        wname = consts.array("int16_t", p["w"], "w16", f"{p['layer']}: {p['wbits']}-bit depthwise weights "
                             f"[{p['O']}][{p['K']}]")
        return "\n".join(["#if MXQN_ROW_KERNELS", _rows(s, fname, rq, pad_offset, wname), "#else",
                          _depthwise(consts, s, fname, epilogue, rq, narrow, pad_offset), "#endif"])
    return _depthwise(consts, s, fname, epilogue, rq, narrow, pad_offset)


def _depthwise(consts: Consts, s: Step, fname: str, epilogue: List[str], rq: Optional[FastRequant],
               narrow: bool, pad_offset: int) -> str:
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    c = p["conv"]
    O, K = p["O"], p["K"]
    H, W, OH, OW, KH, KW = c["H"], c["W"], c["OH"], c["OW"], c["KH"], c["KW"]
    SH, SW, DH, DW, PT, PL = c["SH"], c["SW"], c["DH"], c["DW"], c["PT"], c["PL"]
    wname = consts.array("int16_t", p["w"], "w16", f"{p['layer']}: {p['wbits']}-bit depthwise weights [{O}][{K}]")
    if padded_plane(p) is not None:
        return _padded(consts, s, fname, epilogue, rq, narrow, pad_offset, wname)
    taps = [(ky, kx) for ky in range(KH) for kx in range(KW)]
    oy_lo, oy_hi = _first_inside(PT, SH), _end_inside(PT, SH, (KH - 1) * DH, H, OH)
    ox_lo, ox_hi = _first_inside(PL, SW), _end_inside(PL, SW, (KW - 1) * DW, W, OW)
    oy_lo, ox_lo = min(oy_lo, OH), min(ox_lo, OW)
    oy_hi, ox_hi = max(oy_hi, oy_lo), max(ox_hi, ox_lo)
    unrolled = len(taps) <= 25

    def inside(dst: str, xr: str) -> List[str]:
        return _tap_sum(dst, xr, c, W)

    def store(sum_expr: str, ox: str) -> List[str]:
        return _store(sum_expr, ox, c, epilogue, rq)

    def border(ox: str) -> List[str]:
        return ["{", f"    const int ix0 = {ox} * {SW} - {PL};", "    int32_t sb = 0;",
                f"    for (ky = 0; ky < {KH}; ky++) {{",
                f"        const int iy = iy0 + ky * {DH};",
                f"        if (iy < 0 || iy >= {H}) continue;",
                f"        for (kx = 0; kx < {KW}; kx++) {{",
                f"            const int ix = ix0 + kx * {DW};",
                f"            if (ix >= 0 && ix < {W}) sb += (int32_t)wo[ky * {KW} + kx] * xc[(long)iy * {W} + ix];",
                "        }", "    }"] + ["    " + line for line in store("sb", ox)] + ["}"]

    def ind(lines: List[str], n: int) -> List[str]:
        return [" " * n + line for line in lines]

    wl = [f"        const int32_t w{t} = wo[{t}];" for t in range(len(taps))] if unrolled else []
    hoist = ind(rq.hoist(), 8) if rq is not None else []
    body = [
        f"/* layer '{comment(p['layer'])}' (depthwise, output-stationary): fixed input {x.ctype}, "
        f"{p['wbits']}-bit weights, int32 sums, output '{comment(y.name)}'; interior rows {oy_lo}..{oy_hi - 1}, "
        f"columns {ox_lo}..{ox_hi - 1} without bounds checks */",
        f"static MXQN_LAYER void {fname}(void)", "{",
        f"    const {x.ctype} *x = {ptr(x, True)};",
        f"    {y.ctype} *y = {ptr(y)};"]
    if rq is None:
        body += [f"    {'int32_t' if narrow else 'int64_t'} v;", "    long oi;"]
    body += ["    int o, oy, ox, ky, kx;",
             f"    for (o = 0; o < {O}; o++) {{",
             f"        const int16_t *wo = {wname} + (long)o * {K}L;",
             f"        const {x.ctype} *xc = x + (long)o * {H * W}L;",
             ] + ([f"        {y.ctype} *yo = y + (long)o * {OH * OW}L;"] if rq is not None else []) + wl + hoist
    body += [f"        for (oy = 0; oy < {OH}; oy++) {{",
             f"            const int iy0 = oy * {SH} - {PT};",
             ] + ([f"            {y.ctype} *yr = yo + (long)oy * {OW};"] if rq is not None else []) + [
             f"            if (oy >= {oy_lo} && oy < {oy_hi}) {{",
             f"                const long rb = (long)iy0 * {W} - {PL};",
             f"                for (ox = 0; ox < {ox_lo}; ox++)"] + ind(border("ox"), 20)
    if ox_hi - ox_lo >= 2:  # two neighbouring windows per step
        body += [f"                for (ox = {ox_lo}; ox + 1 < {ox_hi}; ox += 2) {{",
                 f"                    const {x.ctype} *xr = xc + rb + (long)ox * {SW};"]
        body += ind(inside("s0", "xr") + inside("s1", f"(xr + {SW})") + store("s0", "ox") + store("s1", "ox + 1"), 20)
        body += ["                }"]
    else:
        body += [f"                ox = {ox_lo};"]
    body += [f"                for (; ox < {ox_hi}; ox++) {{",
             f"                    const {x.ctype} *xr = xc + rb + (long)ox * {SW};"]
    body += ind(inside("s0", "xr") + store("s0", "ox"), 20)
    body += ["                }",
             f"                for (ox = {ox_hi}; ox < {OW}; ox++)"] + ind(border("ox"), 20)
    body += ["            } else {",
             f"                for (ox = 0; ox < {OW}; ox++)"] + ind(border("ox"), 20)
    body += ["            }", "        }", "    }"]
    return "\n".join(body)
