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
