"""C export: C functions for the steps between quantized layers.

Integer steps (Relu, Clip, MaxPool, Add, Concat, requantization) work on the integer tensors
of the plan; float steps are plain float32 C. The averaging pools sum in the order
onnxruntime's CPU kernels (MLAS) use, so that the float32 results, and the codes quantized
from them, are the reference executor's (which runs those nodes in onnxruntime).
"""

from __future__ import annotations

from typing import List

import numpy as np

from .c_kernels import Consts, chan_loop, comment, debug_codes, load_int, loop_decls, per_channel, ptr, \
    quant_float_code, requant_code
from .c_requant import quant_rq
from .c_float import emit_float_binary, emit_float_unary, emit_gather
from .c_ops import Step


def _fn(name: str, s: Step, body: List[str]) -> str:
    return (f"/* {s.op} '{comment(s.node)}' */\nstatic MXQN_NOINLINE void {name}(void)\n{{\n"
            + "\n".join(body) + "\n}\n")


def _window(p: dict, extra_decl: str = "") -> List[str]:
    """Loop header over channels and output positions, with the valid tap ranges."""
    return [f"    for (c = 0; c < {p['C']}; c++)",
            f"        for (oy = 0; oy < {p['OH']}; oy++) {{",
            f"            iy0 = oy * {p['SH']} - {p['PT']};",
            f"            ky0 = iy0 < 0 ? (-iy0 + {p['DH'] - 1}) / {p['DH']} : 0;",
            f"            ky1 = mxqn_taps({p['H']} - iy0, {p['KH']}, {p['DH']});",
            f"            for (ox = 0; ox < {p['OW']}; ox++) {{",
            f"                ix0 = ox * {p['SW']} - {p['PL']};",
            f"                kx0 = ix0 < 0 ? (-ix0 + {p['DW'] - 1}) / {p['DW']} : 0;",
            f"                kx1 = mxqn_taps({p['W']} - ix0, {p['KW']}, {p['DW']});"]


WIN_DECL = "    int c, oy, ox, ky, kx, iy0, ix0, ky0, ky1, kx0, kx1;"


def emit(consts: Consts, s: Step, name: str, records: list) -> str:
    fn = globals().get("_" + s.op)
    if fn is None:
        raise AssertionError(f"no emitter for {s.op}")
    return fn(consts, s, name, records)


def _float_binary(consts, s, name, records):
    return emit_float_binary(consts, s, name)


def _float_unary(consts, s, name, records):
    return emit_float_unary(consts, s, name)


def _gather(consts, s, name, records):
    return emit_gather(consts, s, name)


def _quant_float(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    body = [f"    const float *x = {ptr(x, True)};", f"    {y.ctype} *y = {ptr(y)};", "    long i;",
            f"    for (i = 0; i < {y.numel}L; i++)", f"        y[i] = {quant_float_code(consts, y, 'x[i]')};",
            debug_codes(y, records)]
    return _fn(name, s, body)


def _quant_int(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    fast = quant_rq(consts, x, y, s.p)
    if fast is not None:  # int32 in, right shifts: one add, one shift, a clamp (c_requant)
        body = [f"    const {x.ctype} *x = {ptr(x, True)};", f"    {y.ctype} *y = {ptr(y)};", "    " + loop_decls(x),
                "    " + chan_loop(x, f"y[i] = {fast};"), debug_codes(y, records)]
        return _fn(name, s, body)
    read = "(int64_t)x[i]" if x.direct else load_int(x, "x[i]")
    body = [f"    const {x.ctype} *x = {ptr(x, True)};", f"    {y.ctype} *y = {ptr(y)};", "    " + loop_decls(x),
            "    " + chan_loop(x, f"y[i] = {requant_code(consts, x, y, s.p, read, 'c')};"), debug_codes(y, records)]
    return _fn(name, s, body)


def _to_float(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    body = [f"    const {x.ctype} *x = {ptr(x, True)};", f"    float *y = {ptr(y)};"]
    if x.kind == "log":
        lv = consts.array("float", x.table.levels, "level", f"levels of {x.quant['node']}")
        body += ["    long i;", f"    for (i = 0; i < {x.numel}L; i++)",
                 (f"        y[i] = x[i] == 0 ? 0.0f : (x[i] < 0 ? -{lv}[-x[i] - 1] : {lv}[x[i] - 1]);" if x.quant["signed"]
                  else f"        y[i] = x[i] == 0 ? 0.0f : {lv}[x[i] - 1];")]
    else:
        body += ["    " + loop_decls(x), "    " + chan_loop(x, f"y[i] = {int_to_float(consts, x, 'x[i]')};")]
    return _fn(name, s, body)


def int_to_float(consts, x, e: str, idx: str = "c") -> str:
    """C for the float32 of ``e * 2^-frac`` as the executor computes it: exact in float64, one
    rounding to float32. Below 2^53 a single rounding of the integer to float32 (``(float)e``,
    correctly rounded) times the exact power of two is the same number, without double
    arithmetic (software on a Cortex-M4), as long as the scale and the products stay normal."""
    f = np.asarray(x.frac).reshape(-1)
    if x.bound < 2 ** 53 and f.max() <= 126 and f.min() >= -(127 - 64):
        if len(set(f.tolist())) == 1:
            return f"(float){e} * {float(np.float32(2.0 ** -int(f[0])))!r}f"
        sc = consts.array("float", (2.0 ** -f.astype(np.float64)).astype(np.float32), "fscale")
        return f"(float){e} * {sc}[{idx}]"
    return f"(float)ldexp((double){e}, {per_channel(consts, -x.frac, 'int32_t', 'nfrac', idx)})"


def _int_relu(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    body = [f"    const {x.ctype} *x = {ptr(x, True)};", f"    {y.ctype} *y = {ptr(y)};", "    long i;",
            "    int64_t v;", f"    for (i = 0; i < {x.numel}L; i++) {{",
            f"        v = {load_int(x, 'x[i]')};", f"        y[i] = ({y.ctype})(v > 0 ? v : 0);", "    }"]
    return _fn(name, s, body)


def _int_clip(consts, s, name, records):
    from .c_layers import _clip_lines

    x, y = s.ins[0], s.outs[0]
    clip = " ".join(_clip_lines(consts, s, "c"))
    body = [f"    const {x.ctype} *x = {ptr(x, True)};", f"    {y.ctype} *y = {ptr(y)};", "    " + loop_decls(x),
            "    int64_t v;", "    " + chan_loop(x, f"v = {load_int(x, 'x[i]')}; {clip} y[i] = ({y.ctype})v;")]
    return _fn(name, s, body)


def _pool_io(s: Step, ctype_in: str, ctype_out: str) -> List[str]:
    x, y = s.ins[0], s.outs[0]
    return [f"    const {ctype_in} *x = {ptr(x, True)};", f"    {ctype_out} *y = {ptr(y)};"]


def _maxpool(s, name, ctype_in: str, ctype_out: str, acc: str, lowest: str, load, cast: str):
    """Max over each window; ``load(index)`` is the C expression reading ``x`` at ``index``."""
    p = s.p
    index = f"((long)c * {p['H']} + iy0 + ky * {p['DH']}) * {p['W']} + ix0 + kx * {p['DW']}"
    body = _pool_io(s, ctype_in, ctype_out) + [WIN_DECL, f"    {acc} m, v;"] + _window(p) + [
        f"                m = {lowest};",
        "                for (ky = ky0; ky < ky1; ky++)",
        "                    for (kx = kx0; kx < kx1; kx++) {",
        f"                        v = {load(index)};",
        "                        if (v > m) m = v;",
        "                    }",
        f"                y[((long)c * {p['OH']} + oy) * {p['OW']} + ox] = {cast}m;",
        "            }", "        }"]
    return _fn(name, s, body)


def _int_maxpool(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    return _maxpool(s, name, x.ctype, y.ctype, "int64_t", "INT64_MIN", lambda i: load_int(x, f"x[{i}]"),
                    f"({y.ctype})")


def _float_maxpool(consts, s, name, records):
    return _maxpool(s, name, "float", "float", "float", "-FLT_MAX", lambda i: f"x[{i}]", "")


def _float_gap(consts, s, name, records):
    """Per channel: four interleaved float32 partial sums, (s0 + s2) + (s1 + s3), the rest one by
    one, then a division: onnxruntime's global pooling kernel, so the results agree bit for bit."""
    p = s.p
    n = p["H"] * p["W"]
    body = _pool_io(s, "float", "float") + ["    int c;", "    long k;", "    float s0, s1, s2, s3, t;",
                                            f"    for (c = 0; c < {p['C']}; c++) {{",
                                            f"        const float *xc = x + (long)c * {n}L;",
                                            "        s0 = s1 = s2 = s3 = 0.0f;",
                                            f"        for (k = 0; k + 4 <= {n}L; k += 4) {{",
                                            "            s0 += xc[k]; s1 += xc[k + 1]; s2 += xc[k + 2]; s3 += xc[k + 3];",
                                            "        }",
                                            "        t = (s0 + s2) + (s1 + s3);",
                                            f"        for (; k < {n}L; k++) t += xc[k];",
                                            f"        y[c] = t / {float(n)!r}f;", "    }"]
    return _fn(name, s, body)


def _float_avgpool(consts, s, name, records):
    """AveragePool in onnxruntime's order: the vector kernel (sums down each column of the
    window, then across) when the width stride is 1 or 2 and kernels are at most 32, else
    row-major sums; then one division by the count."""
    p = s.p
    if p["DH"] != 1 or p["DW"] != 1:
        raise AssertionError("dilated AveragePool is refused by the planner")
    if p["KH"] == p["H"] and p["KW"] == p["W"] and p["SH"] == p["SW"] == 1 and p["PT"] == p["PL"] == 0 \
            and p["OH"] == p["OW"] == 1:
        return _float_gap(consts, s, name, records)
    count = "(float)(ky1 - ky0) * (float)(kx1 - kx0)" if not p["include_pad"] else f"{float(p['KH'] * p['KW'])!r}f"
    vector = p["SW"] <= 2 and p["KH"] <= 32 and p["KW"] <= 32
    body = _pool_io(s, "float", "float") + [WIN_DECL, "    float m;"]
    if vector:
        cs = s.scratch_bufs[0].offset
        body += [f"    float *col = (float *)(mxqn_arena + {cs});", "    int iw;"]
        body += _window(p)[:6] + [
            "                /* column sums over the valid rows (once per output row in onnxruntime) */",
            "                if (ox == 0)",
            f"                    for (iw = 0; iw < {p['W']}; iw++) {{",
            f"                        m = x[((long)c * {p['H']} + iy0 + ky0) * {p['W']} + iw];",
            f"                        for (ky = ky0 + 1; ky < ky1; ky++) m += x[((long)c * {p['H']} + iy0 + ky) * {p['W']} + iw];",
            "                        col[iw] = m;",
            "                    }"] + _window(p)[6:] + [
            "                m = 0.0f;",
            "                for (kx = kx0; kx < kx1; kx++) m = kx == kx0 ? col[ix0 + kx] : m + col[ix0 + kx];"]
    else:
        body += _window(p) + [
            "                m = 0.0f;",
            "                for (ky = ky0; ky < ky1; ky++)",
            "                    for (kx = kx0; kx < kx1; kx++)",
            f"                        m += x[((long)c * {p['H']} + iy0 + ky) * {p['W']} + ix0 + kx];"]
    body += [f"                y[((long)c * {p['OH']} + oy) * {p['OW']} + ox] = m / ({count});", "            }", "        }"]
    return _fn(name, s, body)


def _int_add(consts, s, name, records):
    a, b = s.ins
    y = s.outs[0]
    sa = per_channel(consts, s.p["sa"], "int8_t", "ash")
    sb = per_channel(consts, s.p["sb"], "int8_t", "bsh")
    body = [f"    const {a.ctype} *xa = {ptr(a, True)};", f"    const {b.ctype} *xb = {ptr(b, True)};",
            f"    {y.ctype} *y = {ptr(y)};", "    " + loop_decls(y),
            "    " + chan_loop(y, f"y[i] = ({y.ctype})mxqn_f32_sum((int64_t)((uint64_t){load_int(a, 'xa[i]')} << {sa})"
                                 f" + (int64_t)((uint64_t){load_int(b, 'xb[i]')} << {sb}));")]
    return _fn(name, s, body)


def _concat(consts, s, name, records, is_int):
    y = s.outs[0]
    axis = s.p["axis"]
    outer = int(np.prod(y.shape[:axis]))
    body = [f"    {y.ctype} *y = {ptr(y)};", "    long t, i, o = 0;"]
    for v in s.ins:
        blk = int(np.prod(v.shape[axis:]))
        rd = load_int(v, "x[t * " + str(blk) + "L + i]") if is_int else f"x[t * {blk}L + i]"
        body += ["    {", f"        const {v.ctype} *x = {ptr(v, True)};",
                 f"        for (t = 0; t < {outer}L; t++)",
                 f"            for (i = 0; i < {blk}L; i++)",
                 f"                y[t * {int(np.prod(y.shape[axis:]))}L + o + i] = ({y.ctype}){rd};",
                 f"        o += {blk}L;", "    }"]
    body.append("    (void)o;")
    return _fn(name, s, body)


def _int_concat(consts, s, name, records):
    return _concat(consts, s, name, records, True)


def _float_concat(consts, s, name, records):
    return _concat(consts, s, name, records, False)


def _transpose(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    perm = s.p["perm"]
    nd = len(x.shape)
    in_strides = [int(np.prod(x.shape[i + 1:])) for i in range(nd)]
    body = [f"    const {x.ctype} *x = {ptr(x, True)};", f"    {y.ctype} *y = {ptr(y)};",
            "    long " + ", ".join(f"d{i}" for i in range(nd)) + ", o = 0;"]
    for i in range(nd):
        body.append("    " + "    " * i + f"for (d{i} = 0; d{i} < {y.shape[i]}L; d{i}++)")
    src = " + ".join(f"d{i} * {in_strides[perm[i]]}L" for i in range(nd))
    body.append("    " + "    " * nd + f"y[o++] = x[{src}];")
    return _fn(name, s, body)


def _float_relu(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    body = [f"    const float *x = {ptr(x, True)};", f"    float *y = {ptr(y)};", "    long i;",
            f"    for (i = 0; i < {x.numel}L; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;"]
    return _fn(name, s, body)


def _float_clip(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    lo, hi = s.p["lo"], s.p["hi"]
    ops = []
    if np.isfinite(lo):
        ops.append(f"if (v < {lo!r}f) v = {lo!r}f;")
    if np.isfinite(hi):
        ops.append(f"if (v > {hi!r}f) v = {hi!r}f;")
    body = [f"    const float *x = {ptr(x, True)};", f"    float *y = {ptr(y)};", "    long i;", "    float v;",
            f"    for (i = 0; i < {x.numel}L; i++) {{ v = x[i]; {' '.join(ops)} y[i] = v; }}"]
    return _fn(name, s, body)


def _float_softmax(consts, s, name, records):
    x, y = s.ins[0], s.outs[0]
    n, rows = s.p["n"], s.p["rows"]
    body = [f"    const float *x = {ptr(x, True)};", f"    float *y = {ptr(y)};", "    long r, k;", "    float m, t;",
            f"    for (r = 0; r < {rows}L; r++) {{",
            f"        const float *xr = x + r * {n}L;", f"        float *yr = y + r * {n}L;",
            "        m = xr[0];", f"        for (k = 1; k < {n}L; k++) if (xr[k] > m) m = xr[k];",
            "        t = 0.0f;", f"        for (k = 0; k < {n}L; k++) {{ yr[k] = expf(xr[k] - m); t += yr[k]; }}",
            f"        for (k = 0; k < {n}L; k++) yr[k] = yr[k] / t;", "    }"]
    return _fn(name, s, body)


def _float_layer(consts, s, name, records):
    x, y, p = s.ins[0], s.outs[0], s.p
    w = consts.array("float", p["w"], "fw", f"{s.node}: float weights [{p['O']}][{p['K']}]")
    b = consts.array("float", p["b"], "fb", f"{s.node}: float bias") if p["b"] is not None else None
    body = [f"    const float *x = {ptr(x, True)};", f"    float *y = {ptr(y)};", "    float acc;"]
    if "conv" in p:
        c = dict(p["conv"])
        CG, OG = c["C"] // c["G"], p["O"] // c["G"]
        body += ["    int o, oy, ox, ci, ky, kx, ky0, ky1, kx0, kx1, iy0, ix0;",
                 f"    for (o = 0; o < {p['O']}; o++)", f"        for (oy = 0; oy < {c['OH']}; oy++)",
                 f"            for (ox = 0; ox < {c['OW']}; ox++) {{",
                 f"                const float *wo = {w} + (long)o * {p['K']}L;",
                 f"                const float *xg = x + (long)(o / {OG}) * {CG * c['H'] * c['W']}L;",
                 f"                iy0 = oy * {c['SH']} - {c['PT']}; ix0 = ox * {c['SW']} - {c['PL']};",
                 f"                ky0 = iy0 < 0 ? (-iy0 + {c['DH'] - 1}) / {c['DH']} : 0; ky1 = mxqn_taps({c['H']} - iy0, {c['KH']}, {c['DH']});",
                 f"                kx0 = ix0 < 0 ? (-ix0 + {c['DW'] - 1}) / {c['DW']} : 0; kx1 = mxqn_taps({c['W']} - ix0, {c['KW']}, {c['DW']});",
                 "                acc = 0.0f;",
                 f"                for (ci = 0; ci < {CG}; ci++)",
                 "                    for (ky = ky0; ky < ky1; ky++)",
                 "                        for (kx = kx0; kx < kx1; kx++)",
                 f"                            acc += wo[(ci * {c['KH']} + ky) * {c['KW']} + kx] * "
                 f"xg[((long)ci * {c['H']} + iy0 + ky * {c['DH']}) * {c['W']} + ix0 + kx * {c['DW']}];",
                 f"                y[((long)o * {c['OH']} + oy) * {c['OW']} + ox] = acc{' + ' + b + '[o]' if b else ''};",
                 "            }"]
    else:
        alpha, beta = p.get("alpha", 1.0), p.get("beta", 1.0)
        scale = "" if alpha == 1.0 else f"{alpha!r}f * "
        bias = "" if b is None else (f" + {b}[o]" if beta == 1.0 else f" + {beta!r}f * {b}[o]")
        body += ["    long r, o, k;", f"    for (r = 0; r < {p['rows']}L; r++)",
                 f"        for (o = 0; o < {p['O']}L; o++) {{", "            acc = 0.0f;",
                 f"            for (k = 0; k < {p['K']}L; k++) acc += {w}[o * {p['K']}L + k] * x[r * {p['K']}L + k];",
                 f"            y[r * {p['O']}L + o] = {scale}acc{bias};", "        }"]
    return _fn(name, s, body)
