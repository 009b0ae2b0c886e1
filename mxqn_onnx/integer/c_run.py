"""C export: build and run the generated program from Python (tests, benchmarks, checks).

``build_c`` compiles an export folder with the system C compiler, ``run_c`` feeds samples
through ``./run`` and ``read_records`` / ``write_records`` read and write the debug build's
dump and force files (see the comment at the top of the generated ``main.c``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import MxqnError

#: the build the export promises to be warning-free under
CFLAGS = ("-O2", "-std=c99", "-Wall", "-Wextra")
TYPES = {0: np.int8, 1: np.uint8, 2: np.int16, 3: np.uint16, 4: np.int32, 5: np.int64, 6: np.float32}
TYPE_OF = {"int8_t": 0, "uint8_t": 1, "int16_t": 2, "uint16_t": 3, "int32_t": 4, "int64_t": 5, "float": 6}


def compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build_c(src_dir, exe, debug: bool = False, extra: Sequence[str] = ()) -> str:
    """Compile ``src_dir/*.c`` into ``exe``; returns the compiler's warnings (empty when clean)."""
    cc = compiler()
    if cc is None:
        raise MxqnError("no C compiler found (set CC or install cc)")
    srcs = sorted(str(p) for p in Path(src_dir).glob("*.c"))
    cmd = [cc, *CFLAGS, *(["-DMXQN_DEBUG"] if debug else []), *extra, "-o", str(exe), *srcs, "-lm"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise MxqnError(f"{cc} failed on {src_dir}: {p.stderr.strip()[:2000]}")
    return p.stderr


def run_c(exe, x: np.ndarray, out_size: int, env: Optional[Dict[str, str]] = None,
          workdir: Optional[str] = None) -> Tuple[np.ndarray, str]:
    """``./run IN.bin OUT.bin`` on the samples ``x`` (first axis); returns ([n, out_size], stderr)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        fin, fout = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        np.ascontiguousarray(x, dtype=np.float32).tofile(fin)
        p = subprocess.run([str(exe), str(fin), str(fout)], capture_output=True, text=True,
                           env=dict(os.environ, **(env or {})))
        if p.returncode != 0:
            raise MxqnError(f"{exe} failed: {p.stderr.strip()[:500]}")
        return np.fromfile(fout, np.float32).reshape(len(x), out_size), p.stderr


def read_records(path) -> List[Tuple[str, int, np.ndarray]]:
    """The records of a debug dump: (tensor name, role, values), in the order written."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        n = int(np.frombuffer(data, np.uint32, 1, pos)[0])
        pos += 4
        name = data[pos:pos + n].decode()
        pos += n
        role, typ, cnt = (int(v) for v in np.frombuffer(data, np.uint32, 3, pos))
        pos += 12
        arr = np.frombuffer(data, TYPES[typ], cnt, pos)
        pos += arr.nbytes
        out.append((name, role, arr))
    return out


def write_records(path, records: Sequence[Tuple[str, int, str, np.ndarray]]) -> None:
    """A force file: (tensor name, role, C type, values) per record, in the order the program asks."""
    with open(path, "wb") as f:
        for name, role, ctype, values in records:
            b = name.encode()
            arr = np.ascontiguousarray(values, dtype=TYPES[TYPE_OF[ctype]])
            f.write(np.array([len(b)], np.uint32).tobytes() + b)
            f.write(np.array([role, TYPE_OF[ctype], arr.size], np.uint32).tobytes())
            f.write(arr.tobytes())


def code_size(exe_or_obj) -> Optional[int]:
    """text + data bytes of a binary or object file (``size``), None without binutils."""
    tool = shutil.which("size")
    if tool is None:
        return None
    p = subprocess.run([tool, str(exe_or_obj)], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    text, data = p.stdout.splitlines()[1].split()[:2]
    return int(text) + int(data)


# ---------------------------------------------------------------------- the board (export-c --board)


def arm_tools() -> Optional[str]:
    """None when arm-none-eabi-gcc, arm-none-eabi-size, make and qemu-system-arm are all there,
    else the name of the first one missing."""
    for tool in ("arm-none-eabi-gcc", "arm-none-eabi-size", "make", "qemu-system-arm"):
        if shutil.which(tool) is None:
            return tool
    return None


def build_board(src_dir) -> Path:
    """``make -C src_dir model.elf``; returns the ELF's path (warnings are errors here)."""
    p = subprocess.run(["make", "-s", "-C", str(src_dir), "model.elf"], capture_output=True, text=True)
    if p.returncode != 0:
        raise MxqnError(f"make model.elf failed in {src_dir}: {p.stderr.strip()[:2000]}")
    if "warning" in p.stderr:
        raise MxqnError(f"arm-none-eabi-gcc warnings in {src_dir}: {p.stderr.strip()[:2000]}")
    return Path(src_dir) / "model.elf"


def board_size(elf) -> Dict[str, int]:
    """Section sizes of a board ELF (``arm-none-eabi-size -A``) and the flash / RAM they make:
    flash = .text (code, constants, vectors) + .ARM.exidx + .data's initial values;
    RAM = .data + .bss (the arena and the harness's buffers) + .heap + .stack."""
    p = subprocess.run(["arm-none-eabi-size", "-A", str(elf)], capture_output=True, text=True, check=True)
    sec = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
            sec[parts[0]] = int(parts[1])
    flash = sec.get(".text", 0) + sec.get(".ARM.exidx", 0) + sec.get(".data", 0)
    ram = sec.get(".data", 0) + sec.get(".bss", 0) + sec.get(".heap", 0) + sec.get(".stack", 0)
    return {"flash_bytes": flash, "ram_bytes": ram, "sections": sec}


def measure_board(files: Dict[str, str]) -> Dict[str, int]:
    """Build a board export's files in a temporary folder; flash and RAM of the ELF, and of
    the model alone (model.c's object: code + constants, and its static arena)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        elf = build_board(tmp)
        out = board_size(elf)
        mk = (Path(tmp) / "Makefile").read_text()
        cpu = next(l.split("=", 1)[1].strip() for l in mk.splitlines() if l.startswith("CPU"))
        obj = Path(tmp) / "model.o"
        subprocess.run(["arm-none-eabi-gcc", *cpu.split(), "-mthumb", "-O2", "-std=c99", "-ffp-contract=off",
                        "-c", "-o", str(obj), str(Path(tmp) / "model.c")], check=True, capture_output=True)
        p = subprocess.run(["arm-none-eabi-size", str(obj)], capture_output=True, text=True, check=True)
        text, data, bss = (int(v) for v in p.stdout.splitlines()[1].split()[:3])
        out.update(model_flash_bytes=text + data, model_ram_bytes=data + bss)
        return out


def run_board(src_dir, x: np.ndarray, out_size: int, profile: bool = False):
    """``make -C src_dir qemu`` on the samples ``x``; returns ([n, out_size], instructions per
    sample: QEMU's -icount shift=0 count between the two timer reads around each mxqn_run).
    ``profile``: ``make profile`` instead, and a third value: instructions per sample per step."""
    from .c_board import INSNS_PER_TICK

    with tempfile.TemporaryDirectory() as tmp:
        fin, fout = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        np.ascontiguousarray(x, dtype=np.float32).tofile(fin)
        p = subprocess.run(["make", "-s", "-C", str(src_dir), "profile" if profile else "qemu", f"IN={fin}",
                            f"OUT={fout}"], capture_output=True, text=True)
        if p.returncode != 0 or not fout.exists():
            raise MxqnError(f"make qemu failed in {src_dir}: {(p.stderr or p.stdout).strip()[:1000]}")
        line = next((l for l in (p.stderr + p.stdout).splitlines() if "timer ticks" in l), None)
        if line is None:
            raise MxqnError(f"make qemu in {src_dir} printed no timer count: {p.stderr.strip()[:500]}")
        n, ticks = int(line.split(",")[0].split()[1]), int(line.split("ticks")[1].split()[0])
        y = np.fromfile(fout, np.float32).reshape(len(x), out_size)
        if not profile:
            return y, (ticks * INSNS_PER_TICK) // max(n, 1)
        steps = [int(l.split("ticks")[1]) * INSNS_PER_TICK // max(n, 1) for l in p.stderr.splitlines()
                 if l.startswith("step ")]
        return y, (ticks * INSNS_PER_TICK) // max(n, 1), steps


def callgrind_insns(exe, x: np.ndarray, out_size: int) -> Optional[Tuple[int, Dict[str, int]]]:
    """Instructions per sample inside ``mxqn_run`` on this machine (valgrind's callgrind, only
    ``mxqn_run`` collected), in total and per step function; None without valgrind."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        fin, fout, cg = Path(tmp) / "in.bin", Path(tmp) / "out.bin", Path(tmp) / "cg.out"
        np.ascontiguousarray(x, dtype=np.float32).tofile(fin)
        p = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}", "--toggle-collect=mxqn_run",
                            str(exe), str(fin), str(fout)], capture_output=True, text=True)
        if p.returncode != 0:
            raise MxqnError(f"valgrind {exe} failed: {p.stderr.strip()[-500:]}")
        a = subprocess.run(["callgrind_annotate", "--threshold=100", str(cg)], capture_output=True, text=True).stdout
    total, steps = 0, {}
    for line in a.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].replace(",", "").isdigit():
            n = int(parts[0].replace(",", ""))
            if "PROGRAM TOTALS" in line:
                total = n
            elif ":" in parts[-2] if len(parts) > 2 else False:
                steps[parts[-2].split(":")[-1]] = n
            else:
                steps[parts[1].split(":")[-1]] = n
    return total // max(len(x), 1), {k: v // max(len(x), 1) for k, v in steps.items()}
