"""``export_c``: an mxqn-format model as portable integer-only C99 (``mxqn-onnx export-c``).

Writes three files into a folder: ``model.h`` (the API), ``model.c`` (weights, shifts and
log tables as constants, one static arena, one function per step) and ``main.c`` (a
command-line harness, ``./run IN.bin OUT.bin``). Build: ``cc -O2 -std=c99 -o run DIR/*.c -lm``.

The generated code computes, code for code, what :mod:`mxqn_onnx.integer.executor` (the integer
reference executor) computes; see docs/FORMAT.md, "Integer-only C export". Stages:
:mod:`~mxqn_onnx.integer.c_plan` (read the model, plan tensors, fuse epilogues, place the arena),
:mod:`~mxqn_onnx.integer.c_layers` and :mod:`~mxqn_onnx.integer.c_steps` (C text per step, helpers in
:mod:`~mxqn_onnx.integer.c_kernels`), then this module (files, atomically).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnx

from .c_board import BOARDS, board_files
from .c_fast import DOT_2X2
from .c_requant import RQ
from .c_files import MANIFEST, MARKER, write_export
from .c_kernels import RUNTIME, Consts, comment, per_channel, ptr
from .c_layers import emit_layer, layer_macs, layer_weight_bytes
from .c_ops import Val
from .c_plan import Planner, allocate, fuse
from .c_run import arm_tools, measure_board
from .c_steps import emit
from ..errors import MxqnError
from ..graph.loading import METADATA_KEY

FILES = ("model.h", "model.c", "main.c")


def _load(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise MxqnError(f"{path}: no such file; give the path of an mxqn .onnx model")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise MxqnError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None


def _output_fn(consts: Consts, outputs: Sequence[Val]) -> str:
    """Dequantize / copy every graph output into the caller's buffer, one after another."""
    body, off = [], 0
    for k, v in enumerate(outputs):
        src = ptr(v, True)
        body.append(f"    {{ /* output '{comment(v.name)}' {list(v.shape)} */")
        body.append(f"        const {v.ctype} *x = {src};")
        body.append(f"        float *y = g_out + {off}L;")
        if v.kind == "float":
            body.append(f"        long i;\n        for (i = 0; i < {v.numel}L; i++) y[i] = x[i];")
        elif v.kind == "log":
            lv = consts.array("float", v.table.levels, "level", f"levels of {v.quant['node']}")
            body.append(f"        long i;\n        for (i = 0; i < {v.numel}L; i++)\n"
                        + (f"            y[i] = x[i] == 0 ? 0.0f : (x[i] < 0 ? -{lv}[-x[i] - 1] : {lv}[x[i] - 1]);"
                           if v.quant["signed"] else f"            y[i] = x[i] == 0 ? 0.0f : {lv}[x[i] - 1];"))
        else:
            f = per_channel(consts, -v.frac, "int32_t", "nfrac")
            if v.nch == 1:
                body.append(f"        long i;\n        for (i = 0; i < {v.numel}L; i++) "
                            f"y[i] = (float)ldexp((double)x[i], {f});")
            else:
                outer = v.numel // (v.nch * v.inner)
                body.append(f"        long i, t, j;\n        int c;\n"
                            f"        for (i = 0, t = 0; t < {outer}L; t++)\n"
                            f"            for (c = 0; c < {v.nch}; c++)\n"
                            f"                for (j = 0; j < {v.inner}L; j++, i++) y[i] = (float)ldexp((double)x[i], {f});")
        body.append("    }")
        off += v.numel
    return "static MXQN_NOINLINE void mxqn_outputs(void)\n{\n" + "\n".join(body) + "\n}\n"


HEADER = """/* {marker} from '{model}' ({producer}).
 *
 * int mxqn_run(const float *input, float *output);
 *
 *   Runs one sample. `input` holds MXQN_INPUT_SIZE float32 values in the model's input
 *   layout ({in_name}: {in_shape}, row-major, batch 1); `output` receives MXQN_OUTPUT_SIZE
 *   float32 values: {out_desc}.
 *   Returns 0. Not reentrant: all activations live in one static arena of MXQN_ARENA_BYTES
 *   bytes (sized by liveness); no heap allocation, no I/O.
 *
 *   The input is quantized by the model's first activation quantizer; every quantized layer
 *   runs in integer arithmetic (int8/int16 codes, int32/int64 sums, shifts, log tables);
 *   the output is dequantized to float32. Build: cc -O2 -std=c99 -o run model.c main.c -lm
 *
 * Debug builds (-DMXQN_DEBUG) call mxqn_debug_tensor() after every activation quantizer
 * (role 0: its codes, which the hook may overwrite) and every quantized layer (role 1: the
 * exact accumulator as int64). type: 0 int8, 1 uint8, 2 int16, 3 uint16, 4 int32, 5 int64.
 */
#ifndef MXQN_MODEL_H
#define MXQN_MODEL_H

#define MXQN_INPUT_SIZE {in_size}L
#define MXQN_OUTPUT_SIZE {out_size}L
#define MXQN_ARENA_BYTES {arena}L

int mxqn_run(const float *input, float *output);

#ifdef MXQN_DEBUG
void mxqn_debug_tensor(const char *name, int role, int type, void *data, long count);
#endif

#endif
"""

MAIN = r"""/* {marker}: command-line harness.
 *
 *   ./run IN.bin OUT.bin
 *
 * IN.bin holds raw float32 samples, MXQN_INPUT_SIZE values each, one after another (as many
 * as the file holds); OUT.bin receives MXQN_OUTPUT_SIZE float32 values per sample.
 * MXQN_TIME=1 in the environment prints the time per sample to stderr. Debug builds
 * (-DMXQN_DEBUG) write every quantizer's codes and every layer's accumulator to the file
 * named by MXQN_DUMP, and read forced quantizer codes from MXQN_FORCE (same record format:
 * uint32 name length, name, uint32 role, uint32 type, uint32 count, data).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include "model.h"

#ifdef MXQN_BOARD
/* the board's startup.c: a free-running 25 MHz timer (40 instructions per tick under QEMU's
 * -icount shift=0); the run's count is printed to stderr at the end */
unsigned long mxqn_board_ticks(void);
#define MXQN_NOW() mxqn_board_ticks()
typedef unsigned long mxqn_time_t;
#else
#define MXQN_NOW() clock()
typedef clock_t mxqn_time_t;
#endif

static float in_buf[MXQN_INPUT_SIZE];
static float out_buf[MXQN_OUTPUT_SIZE];

#ifdef MXQN_DEBUG
static FILE *dump_f, *force_f;
static const int type_size[] = {{1, 1, 2, 2, 4, 8, 4}};

void mxqn_debug_tensor(const char *name, int role, int type, void *data, long count)
{{
    uint32_t h[4];
    size_t bytes = (size_t)count * (size_t)type_size[type];
    h[0] = (uint32_t)strlen(name);
    if (dump_f) {{
        h[1] = (uint32_t)role;
        h[2] = (uint32_t)type;
        h[3] = (uint32_t)count;
        fwrite(&h[0], 4, 1, dump_f);
        fwrite(name, 1, h[0], dump_f);
        fwrite(&h[1], 4, 3, dump_f);
        fwrite(data, 1, bytes, dump_f);
    }}
    if (force_f && role == 0) {{
        char skip[4096];
        if (fread(&h[0], 4, 1, force_f) != 1 || h[0] >= sizeof skip || fread(skip, 1, h[0], force_f) != h[0] ||
            fread(&h[1], 4, 3, force_f) != 3 || h[3] != (uint32_t)count || h[2] != (uint32_t)type ||
            fread(data, 1, bytes, force_f) != bytes) {{
            fprintf(stderr, "run: MXQN_FORCE file does not match tensor %s\n", name);
            exit(1);
        }}
    }}
}}
#endif

int main(int argc, char **argv)
{{
    FILE *fi, *fo;
    long n = 0;
    size_t got;
    mxqn_time_t t0, spent = 0;
    if (argc != 3) {{
        fprintf(stderr, "usage: %s IN.bin OUT.bin (raw float32, %ld values per sample in, %ld out)\n",
                argv[0], (long)MXQN_INPUT_SIZE, (long)MXQN_OUTPUT_SIZE);
        return 2;
    }}
    fi = fopen(argv[1], "rb");
    if (!fi) {{
        fprintf(stderr, "run: cannot open %s\n", argv[1]);
        return 2;
    }}
    fo = fopen(argv[2], "wb");
    if (!fo) {{
        fprintf(stderr, "run: cannot create %s\n", argv[2]);
        return 2;
    }}
#ifdef MXQN_DEBUG
    if (getenv("MXQN_DUMP")) dump_f = fopen(getenv("MXQN_DUMP"), "wb");
    if (getenv("MXQN_FORCE")) force_f = fopen(getenv("MXQN_FORCE"), "rb");
#endif
    while ((got = fread(in_buf, sizeof(float), (size_t)MXQN_INPUT_SIZE, fi)) == (size_t)MXQN_INPUT_SIZE) {{
        t0 = MXQN_NOW();
        mxqn_run(in_buf, out_buf);
        spent += MXQN_NOW() - t0;
        if (fwrite(out_buf, sizeof(float), (size_t)MXQN_OUTPUT_SIZE, fo) != (size_t)MXQN_OUTPUT_SIZE) {{
            fprintf(stderr, "run: cannot write %s\n", argv[2]);
            return 1;
        }}
        n++;
    }}
    if (got != 0) {{
        fprintf(stderr, "run: %s ends with a partial sample (%lu of %ld values)\n", argv[1],
                (unsigned long)got, (long)MXQN_INPUT_SIZE);
        return 1;
    }}
    fclose(fi);
    if (fclose(fo) != 0) {{
        fprintf(stderr, "run: cannot write %s\n", argv[2]);
        return 1;
    }}
#ifdef MXQN_BOARD
    if (n > 0)
        fprintf(stderr, "samples %ld, timer ticks %lu (25 MHz)\n", n, (unsigned long)spent);
#ifdef MXQN_PROFILE
    {{
        extern unsigned long mxqn_prof_ticks[];
        extern const int mxqn_prof_steps;
        int k;
        for (k = 0; k < mxqn_prof_steps; k++)
            fprintf(stderr, "step %d ticks %lu\n", k, mxqn_prof_ticks[k]);
    }}
#endif
#endif
    if (getenv("MXQN_TIME") && n > 0)
        fprintf(stderr, "samples %ld, %.3f us per sample\n", n, 1e6 * (double)spent / CLOCKS_PER_SEC / (double)n);
    return 0;
}}
"""


PROFILE = """/* -DMXQN_PROFILE on the board: timer ticks per step (mxqn_prof_ticks[], printed by main.c) */
#if defined(MXQN_PROFILE) && defined(MXQN_BOARD)
unsigned long mxqn_board_ticks(void);
unsigned long mxqn_prof_ticks[{n}];
const int mxqn_prof_steps = {n};
#define MXQN_PROF(i, call) do {{ unsigned long t_ = mxqn_board_ticks(); call; \\
        mxqn_prof_ticks[i] += mxqn_board_ticks() - t_; }} while (0)
#else
#define MXQN_PROF(i, call) call
#endif
"""


def _step_kind(s) -> dict:
    """What a step is, for per-step profiles: a fixed- or log-input layer, float C, or other."""
    if s.op == "layer":
        kind = "layer_log" if s.ins[0].kind == "log" else "layer_fixed"
        return {"op": s.op, "node": s.node, "kind": kind, "macs": layer_macs(s), "fast": bool(s.p.get("fast"))}
    kind = "float" if s.op.startswith("float_") or s.op == "to_float" else "other"
    return {"op": s.op, "node": s.node, "kind": kind, "macs": 0}


def generate(model: onnx.ModelProto, input_shape: Optional[Sequence[int]] = None, name: str = "model",
             board: Optional[str] = None) -> dict:
    """The three files as text plus what the export measured (no files written)."""
    planner = Planner(model, tuple(input_shape) if input_shape is not None else None).plan()
    outputs = planner.outputs
    steps = fuse(planner.steps, outputs)
    arena = allocate(steps, outputs)
    consts = Consts()
    funcs, calls, records, float_ops = [], [], [], []
    op_type = {n.name: n.op_type for n in model.graph.node}
    float_kinds: dict = {}
    weight_bytes = 0
    macs = 0
    prof: list = []
    dbg_max = 1
    for i, s in enumerate(steps):
        if s.op == "view":
            continue
        fname = f"mxqn_step{i}"
        if s.op == "layer":
            funcs.append(emit_layer(consts, s, fname, records))
            macs += layer_macs(s)
            weight_bytes += layer_weight_bytes(s)
            dbg_max = max(dbg_max, s.p["acc"].numel)
        else:
            funcs.append(emit(consts, s, fname, records))
            if s.op.startswith("float_") or s.op == "to_float":
                float_ops.append(f"{s.node} ({s.op})")
                kind = "to float32" if s.op == "to_float" else op_type.get(s.node, s.op)
                float_kinds[kind] = float_kinds.get(kind, 0) + 1
        calls.append(f"    MXQN_PROF({len(calls)}, {fname}()); /* {comment(s.op)} '{comment(s.node)}' */")
        prof.append(dict(_step_kind(s), step=fname))
    funcs.append(_output_fn(consts, outputs))
    calls.append(f"    MXQN_PROF({len(calls)}, mxqn_outputs());")
    prof.append({"step": "mxqn_outputs", "op": "outputs", "node": "", "kind": "other", "macs": 0})
    in_size = int(np.prod(planner.in_shape))
    out_size = sum(v.numel for v in outputs)
    meta = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), "")
    producer = next((p.value for p in model.metadata_props if p.key == "producer"), "") or "mxqn-onnx"
    out_desc = "; ".join(f"{v.name} {list(v.shape)}" for v in outputs)
    header = HEADER.format(marker=MARKER, model=comment(name), producer=comment(producer), in_name=comment(planner.input.name),
                           in_shape=list(planner.in_shape), out_desc=comment(out_desc), in_size=in_size,
                           out_size=out_size, arena=arena)
    body = [f"/* {MARKER}: integer-only C99 for the mxqn model '{comment(name)}'. See model.h. */",
            "#include <stdint.h>", "#include <float.h>", "#include <math.h>", '#include "model.h"', "",
            "/* Steps are separate functions that the caller must not make assumptions about: GCC 12",
            " * at -O1 and above otherwise marks some of them pure and drops the call (ivopts hands its",
            " * pure/const analysis an address it reads as a NULL access). noipa prevents that. */",
            "#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8",
            "#define MXQN_NOINLINE __attribute__((noipa))", "#elif defined(__GNUC__)",
            "#define MXQN_NOINLINE __attribute__((noinline))", "#else",
            "#define MXQN_NOINLINE", "#endif",
            "/* layer loops: ask GCC to vectorize them at -O2 too (clang does by default);",
            " * -DMXQN_NO_VECTORIZE keeps the compiler's own choice (e.g. for size-optimised builds) */",
            "#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8 && !defined(MXQN_NO_VECTORIZE)",
            "#define MXQN_LAYER __attribute__((noipa, optimize(\"tree-vectorize\", \"vect-cost-model=dynamic\")))",
            "#else", "#define MXQN_LAYER MXQN_NOINLINE", "#endif",
            "/* depthwise and few-channel 1x1 layers: row kernels (one loop along an output row, which",
            " * the compiler vectorizes) on cores with vector units; on Cortex-M (no vectors: one MAC",
            " * per instruction at best) the output-stationary kernels. -DMXQN_ROW_KERNELS=0/1 chooses. */",
            "#ifndef MXQN_ROW_KERNELS",
            "#if defined(__ARM_ARCH_PROFILE) && __ARM_ARCH_PROFILE == 'M'",
            "#define MXQN_ROW_KERNELS 0", "#else", "#define MXQN_ROW_KERNELS 1", "#endif", "#endif",
            "/* the 1x1 row kernel only where the vectors multiply int16 into int32 lanes in one instruction",
            " * (AVX2: measured 1.76 -> 1.09 M instructions on the zoo MobileNetV2's 16-channel expansion;",
            " * with SSE2 alone it costs more than the dot-product kernel; on x86 the SSE2 kernel below",
            " * takes these layers before either) */",
            "#ifndef MXQN_ROW_1X1",
            "#if MXQN_ROW_KERNELS && defined(__AVX2__)", "#define MXQN_ROW_1X1 1", "#else",
            "#define MXQN_ROW_1X1 0", "#endif", "#endif",
            "/* x86 (SSE2, every x86-64): the row kernels' sums by pmaddwd (two int16 products summed",
            " * into an int32 lane; SSE2 has no other int16 -> int32 lane multiply); -DMXQN_NO_SIMD keeps",
            " * the portable C above */",
            "#if MXQN_ROW_KERNELS && defined(__SSE2__) && !defined(MXQN_NO_SIMD)",
            "#define MXQN_SSE2 1", "#include <emmintrin.h>", "#else", "#define MXQN_SSE2 0", "#endif",
            "/* constants that kernels read in words (the int16 dot products' rows) */",
            "#if defined(__GNUC__)", "#define MXQN_ALIGNED(n) __attribute__((aligned(n)))", "#else",
            "#define MXQN_ALIGNED(n)", "#endif", "",
            "/* one static arena for every activation, placed by liveness (offsets below) */",
            f"static uint64_t mxqn_arena_words[{max(arena // 8, 1)}];",
            "#define mxqn_arena ((unsigned char *)mxqn_arena_words)",
            "static const float *g_in;", "static float *g_out;", "",
            "#ifdef MXQN_DEBUG", f"static int64_t mxqn_dbg_acc[{dbg_max}];",
            "#define MXQN_DBG_ACC(i, v) (mxqn_dbg_acc[i] = (v))", "#else", "#define MXQN_DBG_ACC(i, v) ((void)0)",
            "#endif", PROFILE.format(n=len(calls)), RUNTIME, RQ, DOT_2X2, "/* ---------------------------------------------------------------- constants */", ""]
    body += consts.lines
    body += ["/* ---------------------------------------------------------------- steps */", ""]
    body += funcs
    body += ["int mxqn_run(const float *input, float *output)", "{", "    g_in = input;", "    g_out = output;"]
    body += calls + ["    return 0;", "}", ""]
    info = {
        "arena_bytes": arena, "const_bytes": consts.bytes, "weight_bytes": weight_bytes,
        "input_name": planner.input.name, "input_shape": list(planner.in_shape), "input_size": in_size,
        "outputs": [{"name": v.name, "shape": list(v.shape)} for v in outputs], "output_size": out_size,
        "layers": sum(1 for s in steps if s.op == "layer"), "steps": len(calls) - 1, "float_ops": float_ops,
        "float_summary": float_kinds, "macs": macs, "profile_steps": prof,
        "debug_records": [{"name": n, "role": r, "type": t, "count": c} for n, r, t, c in records],
        "mxqn_metadata": bool(meta),
    }
    files = {"model.h": header, "model.c": "\n".join(body), "main.c": MAIN.format(marker=MARKER)}
    if board is not None:
        files.update(board_files(board, MARKER))
    return {"files": files, "info": info}


def export_c(model_or_path: Union[str, os.PathLike, onnx.ModelProto], out_dir: Union[str, os.PathLike],
             *, input_shape: Optional[Sequence[int]] = None, board: Optional[str] = None) -> dict:
    """Write the model as integer-only C99 into ``out_dir``; returns what was written.

    Args:
        model_or_path: an mxqn-format model (``mxqn-onnx convert`` / :func:`mxqn_onnx.quantize`
            with ``format="mxqn"``), as a path or an ``onnx.ModelProto``.
        out_dir: the folder to write ``model.h``, ``model.c`` and ``main.c`` (and a manifest,
            ``mxqn-export.json``) into. A new or empty folder is written as a whole or not at
            all; in a folder with other files only this export's own files are written (see
            :mod:`mxqn_onnx.integer.c_files`), never a file it did not write.
        input_shape: the sample shape (batch 1) when the model's input has dynamic dimensions
            other than the batch.
        board: also write startup code, a linker script and a Makefile for this board
            (``mps2-an386``: Cortex-M4F, ``mps2-an500``: Cortex-M7; see
            :mod:`mxqn_onnx.integer.c_board`). With arm-none-eabi-gcc installed the export is
            built once in a temporary folder and ``board_size`` gives its flash and RAM.

    Returns a dict with ``dir``, ``files``, ``arena_bytes`` (the static activation arena),
    ``weight_bytes`` (weights and biases as stored), ``const_bytes`` (every constant array),
    the input/output sizes, ``float_ops`` (steps running in float C) and ``debug_records``
    (what a ``-DMXQN_DEBUG`` build reports, in order).

    Raises MxqnError (one line naming the node) when the model holds something the C export
    cannot express; nothing is written then.
    """
    model = _load(model_or_path)
    name = Path(model_or_path).name if not isinstance(model_or_path, onnx.ModelProto) else (model.graph.name or "model")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MxqnError(f"{out} exists and is not a folder; choose a folder name")
    if board is not None and board not in BOARDS:
        raise MxqnError(f"--board {board}: unknown board; choose one of {', '.join(BOARDS)}")
    gen = generate(model, input_shape, name, board)
    size = None
    if board is not None and arm_tools() is None:
        try:
            size = measure_board(gen["files"])
        except MxqnError as exc:  # e.g. a model larger than the board's memory: said, not fatal
            size = {"error": str(exc).splitlines()[0][:300]}
    write_export(out, gen["files"])
    info = dict(gen["info"])
    info["dir"] = str(out)
    info["board"] = board
    info["board_size"] = size
    info["files"] = [str(out / f) for f in gen["files"]] + [str(out / MANIFEST)]
    return info
