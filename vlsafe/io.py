"""Small file helpers every output uses: atomic directories, hashes, provenance."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import struct
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


# what a full disk, a read-only or unwritable output folder, or a file in place of a folder raise while writing
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
                errno.EISDIR, errno.EEXIST}


def _write_error(target: Path, err: OSError) -> VlsafeError:
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(target) else ""
    return VlsafeError(f"{target}: cannot write output: {err.strerror or err}{where}; nothing was written there")


def _remove_stale_partials(target: Path) -> None:
    """Temp folders of earlier writers of `target` that were killed (kill -9 runs no cleanup): the temp name
    carries the writer's pid, and a folder whose writer is gone is removed; a live writer's is left alone."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[^.]+\.partial$")
    for sibling in target.parent.iterdir():
        match = pattern.match(sibling.name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive (another user's) or not a pid: leave it


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False):
    """Yields a temp directory beside `target`; renames it to `target` only if the block completes.

    An interrupted or failed write leaves nothing at `target` (never a directory that looks complete), and an
    earlier `target` (overwrite=True) stays as it was. A full disk or unwritable folder is a VlsafeError.
    """
    target = Path(target)
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise VlsafeError(f"{target}: output path exists (choose a new one)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    except OSError as err:
        raise _write_error(target, err) from None
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in WRITE_ERRNOS:
            raise _write_error(target, err) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = None
    try:
        if target.exists():
            # the old result is moved aside, not deleted, until the new one is in place
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, aside / target.name)
        os.replace(tmp, target)
    except OSError as err:
        if aside is not None and (aside / target.name).exists() and not target.exists():
            os.replace(aside / target.name, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(target, err) from None
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def write_json(path: str | Path, obj) -> None:
    """Writes JSON through a temp file unique to this writer, so a kill, a full disk or a second process writing
    the same file leaves either the old content or the new one, never a mix or a stray temp file."""
    path = Path(path)
    text = json.dumps(obj, indent=2, default=str) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise VlsafeError(f"{path}: cannot write ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise VlsafeError(f"{path}: cannot write ({err.strerror or err})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------- integrity


def cache_dir() -> Path:
    """The vlsafe cache (VLSAFE_CACHE, default ~/.cache/vlsafe)."""
    return Path(os.environ.get("VLSAFE_CACHE") or Path.home() / ".cache" / "vlsafe").expanduser()


HASH_MEMO = "sha256-cache.json"  # {resolved path: [size, mtime_ns, sha256]}, shared with vlsafe.assets


def _memo() -> tuple[Path, dict]:
    memo_file = cache_dir() / HASH_MEMO
    try:
        known = json.loads(memo_file.read_text())
        return memo_file, known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return memo_file, {}


def sha256_file_memo(path: str | Path) -> str:
    """sha256 of a file, hashed once and then remembered by (path, size, mtime_ns): a second check of a 500 MB
    checkpoint costs a stat. A file rewritten or truncated changes its size or mtime, so it is hashed again."""
    path = Path(path)
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    memo_file, known = _memo()
    entry = known.get(key)
    if isinstance(entry, list) and entry[:2] == stamp and len(entry) == 3:
        return entry[2]
    digest = sha256_file(path)
    known[key] = [*stamp, digest]
    # entries of files that are gone (temp dirs of finished runs) would only grow the memo
    known = {k: v for k, v in known.items() if k == key or os.path.exists(k)}
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(memo_file, known)
    except (OSError, VlsafeError):
        pass  # a memo that cannot be written (read-only cache) costs time, never correctness
    return digest


def weights_content_hash(path: str | Path) -> str:
    """sha256 over 'name:sha256' lines of a checkpoint's .safetensors files, sorted by name: the content hash that
    vlsafe.json records and the evaluation cache keys generations by."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise VlsafeError(f"{path}: no .safetensors weights")
    return sha256_bytes("".join(f"{f.name}:{sha256_file_memo(f)}\n" for f in files).encode())


def check_safetensors_file(path: str | Path) -> None:
    """Cheap structural check without reading the tensors: the header parses and its tensors end exactly where the
    file ends (a truncated or padded file does not)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise VlsafeError(f"{path}: not a complete safetensors file ({err}); the file is damaged or truncated") from None
    if 8 + length + max(ends, default=0) != size:
        raise VlsafeError(f"{path}: truncated or damaged safetensors file ({size} bytes, header says "
                          f"{8 + length + max(ends, default=0)})")


def verify_model_dir(path: str | Path) -> None:
    """Before a model folder is used: every weight file is whole, and when its vlsafe.json records a content hash
    (vlsafe builds, training checkpoints, merges), the weights still hash to it."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        check_safetensors_file(file)
    record = path / "vlsafe.json"
    if not record.is_file() or not files:
        return
    try:
        expected = json.loads(record.read_text()).get("content_sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise VlsafeError(f"{record}: not readable JSON ({err})") from None
    if expected and weights_content_hash(path) != expected:
        raise VlsafeError(f"{path}: weights do not match the content_sha256 recorded in vlsafe.json "
                          f"({expected[:12]}...); the checkpoint was modified or damaged")


def machine() -> dict:
    """What ran it, recorded beside every wall time: the same study takes twice as long on another CPU of the same
    core count (a CPU with bf16 matrix units against one with only bf16 vector instructions), so a time without
    its machine cannot be compared. {"cpu": model name, "threads": torch threads, "bf16": the CPU's bf16 flags,
    "gpu": CUDA device name or None}."""
    import torch

    from vlsafe.precision import cpu_bf16_flags, cpu_info

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_info()[0] or platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "bf16": cpu_bf16_flags(), "gpu": gpu}


def machine_label(record: dict | None) -> str:
    """One line for a `machine()` record: "AMD EPYC, 2 threads, bf16 avx512_bf16"."""
    if not record:
        return "machine not recorded"
    bf16 = f"bf16 {'+'.join(record['bf16'])}" if record.get("bf16") else "no bf16 instructions"
    gpu = f", GPU {record['gpu']}" if record.get("gpu") else ""
    return f"{record.get('cpu')}, {record.get('threads')} threads, {bf16}{gpu}"


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
