"""LLM assets shipped as GGUF, prepared once into the cache as HF directories (see `vlsafe.assets`).

    tokenizers/<name>/   the tokenizer alone, chat template checked to survive the round trip (~7 s once)
    models/<name>/       the LLM dequantised to fp32 safetensors + config + tokenizer (~20 s once, ~1 s to load)

A prepared directory is built in a temp dir under a lock and renamed into place with its stamp written last, so
an interrupted build leaves nothing that looks whole, and parallel workers build it once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from vlsafe import assets
from vlsafe.errors import VlsafeError

STAMP = "vlsafe-asset.json"  # written last into a prepared dir: its presence means the dir is whole
BUILDERS = {"tokenizer": 1, "llm": 1}


def tokenizer_dir(name: str) -> Path:
    """An LLM asset's tokenizer (with its chat template) saved alone: extracted once (~7 s), then ~0.1 s to load."""
    asset = _llm(name)
    return _prepared(assets.cache_dir() / "tokenizers" / name, _stamp(asset, "tokenizer"),
                     lambda out: _build_tokenizer(asset, out))


def llm_dir(name: str) -> Path:
    """An LLM asset as an HF directory (fp32 safetensors, config, tokenizer, chat template), dequantised once."""
    asset = _llm(name)
    return _prepared(assets.cache_dir() / "models" / name, _stamp(asset, "llm"), lambda out: _build_llm(asset, out))


def _llm(name: str) -> assets.Asset:
    asset = assets.get(name)
    if asset.kind != "llm":
        raise VlsafeError(f"asset {name} is a {asset.kind}, not an llm")
    return asset


def _stamp(asset: assets.Asset, builder: str) -> dict:
    # The source hash comes from the registry, so a prepared dir keeps working without its package installed.
    return {"asset": asset.name, "source_sha256": asset.sha256, "builder": builder, "version": BUILDERS[builder]}


def _prepared(dest: Path, stamp: dict, build: Callable[[Path], None]) -> Path:
    """Build into a temp dir, write the stamp last, rename into place: an interrupted build leaves no `dest`."""
    if _current(dest, stamp):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest):
        if _current(dest, stamp):  # another process finished it while we waited
            return dest
        for stale in dest.parent.glob(f".{dest.name}.*.tmp"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            build(tmp)
            (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
            if dest.exists():
                dest.rename(old := dest.with_name(f".{dest.name}.old.tmp"))
                shutil.rmtree(old)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _current(dest: Path, stamp: dict) -> bool:
    try:
        return json.loads((dest / STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _lock(dest: Path) -> Iterator[None]:
    """Serialise builders of one dir across processes (parallel test workers), so it is built once."""
    import fcntl

    with open(dest.parent / f".{dest.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_PROBE = [[{"role": "user", "content": "Hi"}],
          [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]]


def _build_tokenizer(asset: assets.Asset, out: Path) -> None:
    gguf = assets.asset_path(asset.name)  # verified before transformers is even imported
    from transformers import AutoTokenizer

    with assets.progress_bar("items") as progress:
        progress.add_task(f"{asset.name}: reading the tokenizer from GGUF", total=None)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise VlsafeError(f"asset {asset.name}: {gguf.name} carries no chat template")
    tokenizer.save_pretrained(out)
    # The chat template (and the default system prompt inside it) must survive the round trip exactly.
    saved = AutoTokenizer.from_pretrained(out)
    for chat in _PROBE:
        want = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if saved.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) != want:
            raise VlsafeError(f"asset {asset.name}: the chat template changed when saving the tokenizer")


def _build_llm(asset: assets.Asset, out: Path) -> None:
    gguf = assets.asset_path(asset.name)
    tokenizer_files = tokenizer_dir(asset.name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with assets.progress_bar("items") as progress, _quiet_hf_bars(progress, f"{asset.name}: dequantising GGUF tensors"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model keeps its quantizer, and save_pretrained refuses it; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_files)
        # Chat models stop at the template's end-of-turn token, which GGUF metadata may not list as eos.
        eos = {model.config.eos_token_id, tokenizer.eos_token_id} - {None}
        model.generation_config = GenerationConfig(
            bos_token_id=model.config.bos_token_id, eos_token_id=sorted(eos) if len(eos) > 1 else eos.pop(),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        progress.add_task(f"{asset.name}: writing safetensors", total=None)
        model.save_pretrained(out)
    for path in tokenizer_files.iterdir():
        if path.name != STAMP:
            shutil.copy2(path, out / path.name)


@contextlib.contextmanager
def _quiet_hf_bars(progress, description: str) -> Iterator[None]:
    """Route transformers' GGUF tqdm into our rich bar and silence its other bars, so one display stays readable."""
    from unittest import mock

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    def track(iterable, desc=None, **_):
        return progress.track(iterable, total=len(iterable) if hasattr(iterable, "__len__") else None,
                              description=description)

    patch = mock.patch.object(gguf_utils, "tqdm", track) if hasattr(gguf_utils, "tqdm") else contextlib.nullcontext()
    with assets.quiet_transformers(), patch:
        yield
