"""Outputs written atomically (a temporary file in the same folder, then a rename), and never
over a file of the user's."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List

import onnx

from .errors import MxqnError


def save_model_atomic(model: onnx.ModelProto, path) -> None:
    """Write ``model`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, model.SerializeToString(), "model")


def write_atomic(path, data: bytes, what: str) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    An error or interrupt part-way leaves no output (and an older file at ``path`` intact);
    errors become one-line :class:`MxqnError` naming ``what`` was being written.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist; create it first"
        raise MxqnError(f"{folder}: output folder {what}")
    try:
        # os.access() says yes to root even on read-only mounts: try the real thing instead
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise MxqnError(f"{folder}: cannot write to the output folder ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp creates the file 0600; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise MxqnError(f"{path}: cannot write the {what} ({exc.strerror or exc}); nothing was written") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: In a folder mxqn-onnx writes several files into (plots), the list of the files it wrote:
#: only those may be replaced by a later run; any other file there is the user's.
MANIFEST = ".mxqn-files.json"


def _own_files(folder: Path) -> set:
    try:
        return set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def check_folder_files(folder, names, what: str) -> None:
    """Refuse, in one line, to write files ``names`` (relative paths) into ``folder`` where one
    of them exists and was not written there by mxqn-onnx (see :data:`MANIFEST`)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MxqnError(f"{folder}: not a folder; give a folder for the {what}")
    ours = _own_files(folder)
    for name in names:
        if (folder / name).exists() and name not in ours:
            raise MxqnError(f"{folder / name} exists and was not written by mxqn-onnx; give a new or empty "
                            f"folder for the {what}, or move that file away")


def write_folder_files(folder, render: Callable[[Path], List[Path]], what: str) -> List[Path]:
    """Write a set of files into ``folder`` as a whole or not at all, touching no file it did
    not write: ``render(staging)`` writes them into a staging folder inside ``folder``; then
    each replaces the same name in ``folder`` (refused, before any is moved, where that name is
    a file of the user's), files of an earlier run that this one did not write again are
    removed, and the manifest lists the new set. Returns the files' final paths."""
    folder = Path(folder)
    check_folder_files(folder, [], what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".mxqn-staging.", dir=folder))
    except OSError as exc:
        raise MxqnError(f"{folder}: cannot write the {what} there ({exc.strerror or exc})") from None
    try:
        names = [p.relative_to(staging).as_posix() for p in render(staging)]
        check_folder_files(folder, names, what)
        old = _own_files(folder)
        for name in names:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, folder / name)
        for name in old - set(names):  # ours, from an earlier run: stale now
            if (folder / name).is_file():
                (folder / name).unlink()
        write_atomic(folder / MANIFEST, (json.dumps({"files": sorted(names)}, indent=1) + "\n").encode(),
                     "file list")
    except OSError as exc:
        raise MxqnError(f"{folder}: cannot write the {what} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in names]


def check_replaceable(path, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse, in one line, to overwrite an existing file that mxqn-onnx did not write."""
    path = Path(path)
    if path.is_file() and not is_ours(path):
        raise MxqnError(f"{path} exists and was not written by mxqn-onnx; choose another name for the {what}, "
                        "or remove that file first")
