"""Batched generation: left padding, KV cache, stop at EOS; greedy by default, seeded sampling on request.

Generate once, judge many: with a `Cache`, every prompt whose (model fingerprint, prompt, system prompt, image
sha256, decoding, backend) was generated before is read back, and only the rest reach the model.

Backends: `hf` (default: the model in this process, any `checkpoint.Bundle`) and `vllm` (optional, GPUs; only for
HF-exported directories, i.e. `LlavaForConditionalGeneration` from `vlsafe export-hf` or a plain causal LM).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            out |= {"temperature": self.temperature, "top_p": self.top_p}
        else:  # silence generation_config sampling defaults that greedy decoding ignores
            out |= {"temperature": None, "top_p": None, "top_k": None}
        return out

    def key(self) -> str:
        """The settings that change the output: greedy decoding ignores seed, temperature and top_p, so greedy
        runs under different seeds share their cached generations."""
        settings = dataclasses.asdict(self) if self.do_sample else {"max_new_tokens": self.max_new_tokens,
                                                                     "do_sample": False}
        return json.dumps(settings, sort_keys=True)


# ------------------------------------------------------------------------------------------------ fingerprints
@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from vlsafe.io import sha256_file

    return sha256_file(path)


def image_sha256(path: str | None) -> str | None:
    """Content hash of an image: the key must not change when the same picture lives at another path."""
    if path is None:
        return None
    stat = Path(path).stat() if Path(path).is_file() else None
    if stat is None:
        raise VlsafeError(f"{path}: image not found")
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _dir_hash(path: str, stamp: tuple) -> str:
    from vlsafe.model.checkpoint import content_hash

    return content_hash(path)


def weights_dir(bundle) -> Path | None:
    """The safetensors directory a bundle was loaded from, if any (presets load from a cache dir)."""
    for candidate in (bundle.source, getattr(bundle.model, "name_or_path", "")):
        if candidate and Path(candidate).is_dir() and any(Path(candidate).glob("*.safetensors")):
            return Path(candidate)
    return None


def model_fingerprint(bundle) -> str:
    """Weights plus chat template: the same weights behind another template answer different token sequences.

    A model loaded from a directory is hashed by its files (`checkpoint.content_hash`); one built in memory
    (pico, a fresh VLM@0) by its tensors. Remembered on the bundle: hashing 500 MB takes a second.
    """
    cached = getattr(bundle, "_vlsafe_fingerprint", None)
    if cached:
        return cached
    directory = weights_dir(bundle)
    if directory is not None:
        stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(directory.glob("*.safetensors")))
        weights = _dir_hash(str(directory), stamp)
    else:
        digest = hashlib.sha256()
        for name, tensor in sorted(bundle.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        weights = digest.hexdigest()
    template = getattr(bundle.tokenizer, "chat_template", None) or ""
    fingerprint = hashlib.sha256(f"{weights}\n{template}".encode()).hexdigest()
    bundle._vlsafe_fingerprint = fingerprint
    return fingerprint


# ------------------------------------------------------------------------------------------------ generation
def generate(bundle, prompts: list[Prompt], decoding: Decoding = Decoding(), batch_size: int = 16,
             system: str | None = None, progress=None, cache=None, backend: str = "hf") -> list[str]:
    """One response per prompt, in order; with `cache` (a `vlsafe.eval.cache.Cache`) only the misses run."""
    if backend not in BACKENDS:
        raise VlsafeError(f"unknown generation backend {backend!r} (known: {', '.join(BACKENDS)})")
    run = _generate_hf if backend == "hf" else _generate_vllm
    if cache is None:
        return run(bundle, prompts, decoding, batch_size, system, progress)
    rows = _rows(bundle, prompts, decoding, system, backend)
    found = cache.get_many([r["key"] for r in rows])
    if progress is not None and found:
        progress(sum(r["key"] in found for r in rows))
    todo = [i for i, r in enumerate(rows) if r["key"] not in found]
    seen: dict[str, int] = {}
    unique = [i for i in todo if seen.setdefault(rows[i]["key"], i) == i]  # the same item twice: generate once
    if unique:
        fresh = run(bundle, [prompts[i] for i in unique], decoding, batch_size, system, progress)
        cache.put_many([{**rows[i], "response": text} for i, text in zip(unique, fresh)])
        found.update({rows[i]["key"]: text for i, text in zip(unique, fresh)})
        if progress is not None and len(todo) > len(unique):
            progress(len(todo) - len(unique))
    return [found[r["key"]] for r in rows]


def generation_keys(bundle, prompts: list[Prompt], decoding: Decoding = Decoding(), system: str | None = None,
                    backend: str = "hf") -> list[str]:
    """The cache keys `generate` uses for these prompts: what judgements made on the responses are keyed by."""
    return [row["key"] for row in _rows(bundle, prompts, decoding, system, backend)]


def _rows(bundle, prompts, decoding, system, backend) -> list[dict]:
    from vlsafe.eval.cache import generation_key

    fingerprint = model_fingerprint(bundle)
    rows = []
    for p in prompts:
        row = {"model": fingerprint, "prompt": p.text, "system": system, "image_sha256": image_sha256(p.image),
               "decoding": decoding.key(), "backend": backend}
        row["key"] = generation_key(row["model"], row["prompt"], row["system"], row["image_sha256"],
                                    row["decoding"], row["backend"])
        rows.append(row)
    return rows


def _generate_hf(bundle, prompts, decoding, batch_size, system, progress) -> list[str]:
    """Prompts are sorted by length so batches waste little padding."""
    fmt = bundle.formatter()
    model = bundle.model
    encoded = [fmt.encode_prompt(p.text, p.image, system=system, record_id=p.id) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i].input_ids))
    eos = bundle.tokenizer.convert_tokens_to_ids(bundle.tokenizer.eos_token)
    stop = list(dict.fromkeys([t for t in _as_list(model.generation_config.eos_token_id) + [eos] if t is not None]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = fmt.collate([encoded[i] for i in idx], padding_side="left")
        batch.pop("labels")
        if decoding.do_sample:
            torch.manual_seed(decoding.seed + start)
        with torch.inference_mode():
            seqs = model.generate(**batch, **decoding.kwargs(), eos_token_id=stop,
                                  pad_token_id=fmt.tokenizer.pad_token_id or eos)
        new = seqs[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            out[i] = bundle.tokenizer.decode(new[row], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return out


def _generate_vllm(bundle, prompts, decoding, batch_size, system, progress) -> list[str]:
    """vLLM schedules its own batches; `batch_size` does not apply. Images travel as data URLs."""
    directory = weights_dir(bundle)
    if directory is None:
        raise VlsafeError("backend 'vllm' needs a model loaded from an HF directory (`vlsafe export-hf` for VLMs)")
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") == "vlsafe_vlm":
        raise VlsafeError(f"{directory}: a vlsafe VLM directory; vLLM needs `vlsafe export-hf {directory} OUT` first")
    try:
        import vllm
    except ImportError:
        raise VlsafeError("backend 'vllm' needs the vllm package (pip install 'vlsafe[vllm]', GPU machines)") from None
    import base64

    llm = vllm.LLM(model=str(directory), seed=decoding.seed)
    params = vllm.SamplingParams(max_tokens=decoding.max_new_tokens, seed=decoding.seed,
                                 temperature=decoding.temperature if decoding.do_sample else 0.0,
                                 top_p=decoding.top_p if decoding.do_sample else 1.0)
    conversations = []
    for p in prompts:
        content: list[dict] = [{"type": "text", "text": p.text}]
        if p.image is not None:
            data = base64.b64encode(Path(p.image).read_bytes()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        conversations.append(turns)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    if progress is not None:
        progress(len(prompts))
    return [o.outputs[0].text.strip() for o in outputs]


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
