"""Files the project writes for users: whole or not at all (a temporary name, then a rename) and readable by
others (the mode open() gives: 0666 less the umask)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write `text` under a temporary name, then rename: readers never see half a file (processes writing the
    same file at once each use their own temporary)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
    except OSError as e:  # a full disk, a file size limit: no temporary left behind, the file named
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def written_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary dir to fill; on success it replaces `path`, its files readable by others. `path` is
    never half-written: an error leaves the old one (or none) in place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    umask_file_modes(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def umask_file_modes(directory: str | os.PathLike) -> None:
    """Give every file under `directory` the mode open() gives (0666 less the umask, 0644 as a rule):
    safetensors writes its files 0600, unreadable by the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    for file in Path(directory).rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)
