"""Small file helpers every output uses: atomic directories, hashes, provenance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from vlsafe.errors import VlsafeError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False):
    """Yields a temp directory beside `target`; renames it to `target` only if the block completes.

    An interrupted or failed write leaves nothing at `target` (never a directory that looks complete).
    """
    target = Path(target)
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise VlsafeError(f"{target}: output path exists (choose a new one)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    os.replace(tmp, target)


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def versions() -> dict:
    """Library versions that change numbers, recorded beside every output."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("vlsafe", "torch", "transformers", "accelerate", "peft", "trl", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
