"""C export: one C function per quantized layer (integer arithmetic only).

The layer computes the executor's exact accumulator (:func:`mxqn_onnx.integer.kernels.accumulate`):
the integer sum of weight codes times input codes (log inputs expanded to ``T24[r] << shift``
first), aligned with the int32 bias, then its epilogue: the Relu/Clip that follow and the
next quantizer's requantization, so that the layer writes codes straight into the arena.
"""

from __future__ import annotations

from typing import List

import numpy as np

from .c_fast import emit_fast_layer
from .c_kernels import TYPE_CODE, Consts, c_string, comment, per_channel, ptr, requant_code
from .c_ops import Step, Val


def _weights(consts: Consts, s: Step) -> str:
    p = s.p
    w = p["w"]
    name = p["layer"]
    if p["container"] == "int4":
        flat = w.reshape(-1).astype(np.int64)
        if flat.size % 2:
            flat = np.append(flat, 0)
        packed = (flat[0::2] & 15) | ((flat[1::2] & 15) << 4)
        return consts.array("uint8_t", packed, "w4", f"{name}: int4 weights [{p['O']}][{p['K']}], "
                                                      "two per byte, low nibble first")
    ct = "int16_t" if p["container"] == "int16" else "int8_t"
    return consts.array(ct, w, "w", f"{name}: {p['wbits']}-bit weights [{p['O']}][{p['K']}]")


def _epilogue(consts: Consts, s: Step, records: list) -> List[str]:
    """Statements turning the sum ``s`` of output ``oi`` (channel ``o``) into the stored value."""
    p = s.p
    acc: Val = p["acc"]
    lines = ["v = (int64_t)sum;"]
    if np.any(p["rs"]):
        lines.append(f"v = mxqn_srne(v, {per_channel(consts, p['rs'], 'int8_t', 'rs', 'o')});")
    if p["bias"] is not None:
        ct = "int32_t" if p.get("bias_is_stored") else "int64_t"
        note = f"{p['layer']}: int32 bias" if ct == "int32_t" else f"{p['layer']}: bias aligned to the sum"
        lines.append(f"v += {consts.array(ct, p['bias'], 'b', note)}[o];")
    lines.append("MXQN_DBG_ACC(oi, v);")
    cur = acc
    y: Val = s.outs[0]
    for e in p["epi"]:
        if e.op in ("int_relu", "int_clip") and cur is acc and acc.needs_r24():
            lines.append("v = mxqn_f32(v); /* the float32 value the float graph holds */")
        if e.op == "int_relu":
            lines.append("if (v < 0) v = 0;")
        elif e.op == "int_clip":
            lines.extend(_clip_lines(consts, e, "o"))
        cur = e.outs[0]
    last = p["epi"][-1] if p["epi"] else None
    if last is not None and last.op == "quant_int":
        lines.append(f"y[oi] = {requant_code(consts, last.ins[0], y, last.p, 'v', 'o')};")
    else:
        lines.append(f"y[oi] = ({y.ctype})v;")
    return lines


def _clip_lines(consts: Consts, e: Step, idx: str) -> List[str]:
    out = []
    for key, cmp in (("lo", "<"), ("hi", ">")):
        vals = e.p[key]
        if all(v is None for v in vals):
            continue
        vals = [v if v is not None else (-(2 ** 62) if key == "lo" else 2 ** 62) for v in vals]
        expr = per_channel(consts, vals, "int64_t", "clip" + key, idx)
        out.append(f"if (v {cmp} {expr}) v = {expr};")
    return out


def emit_layer(consts: Consts, s: Step, fname: str, records: list) -> str:
    p = s.p
    x: Val = s.ins[0]
    y: Val = s.outs[0]
    acc: Val = p["acc"]
    if p.get("fast"):
        col = dict(zip([n for n, _ in s.scratch], s.scratch_bufs))["col"].offset if "col" in dict(s.scratch) else 0
        return emit_fast_layer(consts, s, fname, lambda: _epilogue(consts, s, records), col) + "\n" + \
            "\n".join(_debug(s, records)) + "\n}\n"
    O, K = p["O"], p["K"]
    st = p["sum_type"]
    wname = _weights(consts, s)
    int4 = p["container"] == "int4"
    wt = "int8_t" if int4 or p["container"] == "int8" else "int16_t"
    lut = x.kind == "log" and "lut" in p["log"]
    xt = "int64_t" if x.kind == "log" and not lut else x.ctype
    head = [f"/* {comment(s.op)} '{comment(p['layer'])}': {x.kind} input {x.ctype}, "
            f"{p['wbits']}-bit weights ({p['container']}), {st} sums, output '{comment(y.name)}' */",
            f"static MXQN_LAYER void {fname}(void)", "{"]
    body = [f"    {y.ctype} *y = {ptr(y)};"]
    decl = ["    int64_t v;", "    int o;"]
    scratch = dict(zip([n for n, _ in s.scratch], s.scratch_bufs))
    pre = []

    def rd(e: str) -> str:  # an input element as the integer the sum uses
        return f"L[{e}]" if lut else e

    if x.kind == "log":
        lg = p["log"]
        t24 = consts.array("int32_t", lg["t24"], "t24", f"2^(r/2^{lg['k']}) as 24-bit integers")
        logx = f"mxqn_logx({{}}, {t24}, {lg['k']}, {lg['r0']}, {lg['sbase']})"
        decl.append("    long i;")
        if lut:  # the level of each code: M entries built from the 2^k-entry table and shifts
            lo = -lg["M"] if x.quant["signed"] else 0
            body.append(f"    int64_t *lut = (int64_t *)(mxqn_arena + {scratch['lut'].offset});")
            body.append(f"    const int64_t *L = lut + {-lo};")
            body.append(f"    const {x.ctype} *x = {ptr(x, True)};")
            pre.append(f"    for (i = {lo}; i <= {lg['M']}; i++)\n        lut[i + {-lo}] = {logx.format('(int32_t)i')};")
        else:  # wide codes: expand the whole input once
            body.append(f"    const {x.ctype} *xin = {ptr(x, True)};")
            body.append(f"    int64_t *xe = (int64_t *)(mxqn_arena + {scratch['xe'].offset});")
            body.append("    const int64_t *x = xe;")
            pre.append(f"    for (i = 0; i < {x.numel}L; i++)\n        xe[i] = {logx.format('xin[i]')};")
    else:
        body.append(f"    const {x.ctype} *x = {ptr(x, True)};")
    if int4:
        body.append(f"    int8_t *wrow = (int8_t *)(mxqn_arena + {scratch['wrow'].offset});")
        decl.append("    long e;")
        load_w = (f"        for (e = 0; e < {K}L; e++) {{\n"
                  f"            const long g = (long)o * {K}L + e;\n"
                  f"            const int b = (g & 1) ? ({wname}[g >> 1] >> 4) : ({wname}[g >> 1] & 15);\n"
                  f"            wrow[e] = (int8_t)((b ^ 8) - 8);\n        }}\n"
                  f"        w = wrow;\n")
    else:
        load_w = f"        w = {wname} + (long)o * {K}L;\n"
    decl.append(f"    const {wt} *w;")
    epi = "\n".join("                " + line for line in _epilogue(consts, s, records))

    def mul(wi: str, xe: str) -> str:
        return f"({st}){wi} * ({st}){xe}"

    if "convT" in p:
        loops = _conv_transpose_loops(p, load_w, st, rd, epi, scratch["plane"].offset, decl)
    elif "conv" in p:
        c = p["conv"]
        G = c["G"]
        CG, OG = c["C"] // G, O // G
        H, W, OH, OW = c["H"], c["W"], c["OH"], c["OW"]
        plane = scratch["plane"].offset
        decl.append("    int ci, ky, kx, oy, ox, oy0, oy1, ox0, ox1;")
        decl.append("    long oi, q;")
        body.append(f"    {st} *acc = ({st} *)(mxqn_arena + {plane});")
        # weight-stationary: each weight tap adds its contribution to a whole output plane,
        # rows of contiguous inputs (exact integer sums: the order does not matter)
        loops = (f"    for (o = 0; o < {O}; o++) {{\n{load_w}"
                 f"        const {xt} *xg = x + (long)(o / {OG}) * {CG * H * W}L;\n"
                 f"        for (q = 0; q < {OH * OW}L; q++) acc[q] = 0;\n"
                 f"        for (ci = 0; ci < {CG}; ci++)\n"
                 f"            for (ky = 0; ky < {c['KH']}; ky++) {{\n"
                 f"                oy0 = mxqn_first(ky * {c['DH']} - {c['PT']}, {c['SH']});\n"
                 f"                oy1 = mxqn_end(ky * {c['DH']} - {c['PT']}, {H}, {c['SH']}, {OH});\n"
                 f"                for (kx = 0; kx < {c['KW']}; kx++) {{\n"
                 f"                    const {st} wv = ({st})w[(ci * {c['KH']} + ky) * {c['KW']} + kx];\n"
                 f"                    const long xc = (long)ci * {H * W}L + kx * {c['DW']} - {c['PL']};\n"
                 f"                    if (wv == 0) continue;\n"
                 f"                    ox0 = mxqn_first(kx * {c['DW']} - {c['PL']}, {c['SW']});\n"
                 f"                    ox1 = mxqn_end(kx * {c['DW']} - {c['PL']}, {W}, {c['SW']}, {OW});\n"
                 f"                    for (oy = oy0; oy < oy1; oy++) {{\n"
                 f"                        const long xr = xc + (long)(oy * {c['SH']} + ky * {c['DH']} - {c['PT']}) * {W};\n"
                 f"                        {st} *ar = acc + (long)oy * {OW};\n"
                 f"                        for (ox = ox0; ox < ox1; ox++)\n"
                 f"                            ar[ox] += wv * ({st}){rd('xg[xr + ox * ' + str(c['SW']) + ']')};\n"
                 f"                    }}\n                }}\n            }}\n"
                 f"        for (q = 0; q < {OH * OW}L; q++) {{\n"
                 f"            const {st} sum = acc[q];\n"
                 f"            oi = (long)o * {OH * OW}L + q;\n"
                 f"{epi}\n        }}\n    }}")
    else:
        decl.append("    long r, k, oi;")
        loops = (f"    for (o = 0; o < {O}; o++) {{\n{load_w}"
                 f"        for (r = 0; r < {p['rows']}L; r++) {{\n"
                 f"            const {xt} *xr = x + r * {K}L;\n"
                 f"            {st} sum = 0;\n"
                 f"            for (k = 0; k < {K}L; k++)\n"
                 f"                sum += {mul('w[k]', rd('xr[k]'))};\n"
                 f"            oi = r * {O}L + o;\n"
                 f"{epi}\n        }}\n    }}")
    return "\n".join(head + body + decl + pre + [loops] + _debug(s, records) + ["}"]) + "\n"


def _debug(s: Step, records: list) -> List[str]:
    """The debug build's reports after a layer: its exact sum, and its codes when it ends in a quantizer."""
    acc, y = s.p["acc"], s.outs[0]
    records.append((acc.name, 1, "int64_t", acc.numel))
    dbg = [f"#ifdef MXQN_DEBUG\n    mxqn_debug_tensor({c_string(acc.name)}, 1, {TYPE_CODE['int64_t']}, "
           f"(void *)mxqn_dbg_acc, {acc.numel}L);"]
    if y.quant is not None:
        records.append((y.name, 0, y.ctype, y.numel))
        dbg.append(f"    mxqn_debug_tensor({c_string(y.name)}, 0, {TYPE_CODE[y.ctype]}, (void *)y, {y.numel}L);")
    dbg.append("#endif")
    return dbg


def _conv_transpose_loops(p, load_w, st, rd, epi, plane, decl) -> str:
    """Weight-stationary scatter: each tap adds ``w * x`` of a whole input plane to the output
    positions ``iy * SH + ky * DH - PT`` (exact integer sums: the order does not matter)."""
    c = p["convT"]
    O, G = p["O"], c["G"]
    CG, OG = c["C"] // G, O // G
    H, W, OH, OW = c["H"], c["W"], c["OH"], c["OW"]
    decl.append("    int ci, ky, kx, iy, ix, oy, ox;")
    decl.append("    long oi, q;")
    return (f"    {st} *acc = ({st} *)(mxqn_arena + {plane});\n"
            f"    for (o = 0; o < {O}; o++) {{\n{load_w}"
            f"        for (q = 0; q < {OH * OW}L; q++) acc[q] = 0;\n"
            f"        for (ci = 0; ci < {CG}; ci++)\n"
            f"            for (ky = 0; ky < {c['KH']}; ky++)\n"
            f"                for (kx = 0; kx < {c['KW']}; kx++) {{\n"
            f"                    const {st} wv = ({st})w[(ci * {c['KH']} + ky) * {c['KW']} + kx];\n"
            f"                    const long xc = ((long)(o / {OG}) * {CG} + ci) * {H * W}L;\n"
            f"                    if (wv == 0) continue;\n"
            f"                    for (iy = 0; iy < {H}; iy++) {{\n"
            f"                        oy = iy * {c['SH']} + ky * {c['DH']} - {c['PT']};\n"
            f"                        if (oy < 0 || oy >= {OH}) continue;\n"
            f"                        for (ix = 0; ix < {W}; ix++) {{\n"
            f"                            ox = ix * {c['SW']} + kx * {c['DW']} - {c['PL']};\n"
            f"                            if (ox < 0 || ox >= {OW}) continue;\n"
            f"                            acc[(long)oy * {OW} + ox] += wv * ({st}){rd('x[xc + (long)iy * ' + str(W) + ' + ix]')};\n"
            f"                        }}\n                    }}\n                }}\n"
            f"        for (q = 0; q < {OH * OW}L; q++) {{\n"
            f"            const {st} sum = acc[q];\n"
            f"            oi = (long)o * {OH * OW}L + q;\n"
            f"{epi}\n        }}\n    }}")


def layer_macs(s: Step) -> int:
    """Multiply-accumulates of one run of the layer (weights times output positions)."""
    p = s.p
    c = p.get("conv") or p.get("convT")
    if "conv" in p:
        return p["O"] * p["K"] * c["OH"] * c["OW"]
    if "convT" in p:  # each input pixel meets every weight once
        return p["O"] * p["K"] * c["H"] * c["W"]
    return p["O"] * p["K"] * p["rows"]


def layer_weight_bytes(s: Step) -> int:
    p = s.p
    n = p["O"] * p["K"]
    w = (n + 1) // 2 if p["container"] == "int4" else n * (2 if p["container"] == "int16" else 1)
    b = 0 if p["bias"] is None else p["O"] * (4 if p.get("bias_is_stored") else 8)
    return w + b


__all__ = ["emit_layer", "layer_weight_bytes"]
