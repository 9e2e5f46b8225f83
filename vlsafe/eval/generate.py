"""Batched generation: left padding, KV cache, finished rows leave and new prompts join the batch (continuous
batching), a shared prompt prefix runs once; greedy by default, seeded sampling on request.

Generate once, judge many: with a `Cache`, every prompt whose (model fingerprint, prompt, system prompt, image
sha256, decoding, backend) was generated before is read back, and only the rest reach the model.

Precision is part of the decoding (`Decoding.dtype`, fp32 or bf16): the model's weights are cast to it before the
first token, and a non-fp32 precision is part of the cache key, so bf16 and fp32 answers never mix.

Backends: `hf` (default: the model in this process, any `checkpoint.Bundle`) and `vllm` (optional, GPUs; only for
HF-exported directories, i.e. `LlavaForConditionalGeneration` from `vlsafe export-hf` or a plain causal LM).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError
from vlsafe.precision import EXACT_CANDIDATES

BACKENDS = ("hf", "vllm")


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "fp32"  # fp32 | bf16 (vlsafe.precision: resolve `auto` before building a Decoding)

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
                                                                     "do_sample": False, "dtype": self.dtype}
        if settings["dtype"] == "fp32":  # keys written before precision was a setting were fp32 ones
            settings.pop("dtype")
        else:  # bf16 answers written before the residual and top logits stayed fp32 are not these
            settings["fp32"] = f"residual,norm,top{EXACT_CANDIDATES}-logits"  # vlsafe.precision.mixed_bf16
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
            # reshape: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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
        return run(bundle, prompts, decoding, batch_size, system, progress, None)
    rows = _rows(bundle, prompts, decoding, system, backend)
    found = cache.get_many([r["key"] for r in rows])
    if progress is not None and found:
        progress(sum(r["key"] in found for r in rows))
    todo = [i for i, r in enumerate(rows) if r["key"] not in found]
    seen: dict[str, int] = {}
    unique = [i for i in todo if seen.setdefault(rows[i]["key"], i) == i]  # the same item twice: generate once
    if unique:
        def store(done: dict[int, str]) -> None:  # as answers finish: a killed run keeps what it generated
            cache.put_many([{**rows[unique[j]], "response": text} for j, text in done.items()])

        fresh = run(bundle, [prompts[i] for i in unique], decoding, batch_size, system, progress, store)
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


def _generate_hf(bundle, prompts, decoding, batch_size, system, progress, on_done) -> list[str]:
    """Up to `batch_size` rows decode together, in segments of SEGMENT_TOKENS new tokens.

    Answers vary from a few tokens to the whole budget, and `model.generate` keeps every row until the longest is
    done; so after each segment the finished rows leave the batch (their text is final), and once half the batch
    has left, the next prompts join it (continuous batching): the rows that run long share their steps with
    new ones instead of running alone. Prompts go in order of length (little padding), at most PREFILL_TOKENS
    padded prompt tokens join at a time (a few long prompts do not pad many short ones), and the tokens every
    prompt starts with (the chat template's preamble and system prompt: often most of a short prompt) run once.
    Greedy answers are those of one `model.generate` per prompt, up to float rounding. `on_done` (optional) gets
    {prompt index: answer} as answers finish.
    """
    fmt, model = bundle.formatter(), set_precision(bundle, decoding.dtype)
    encoded = [fmt.encode_prompt(p.text, p.image, system=system, record_id=p.id) for p in prompts]
    pending = sorted(range(len(prompts)), key=lambda i: len(encoded[i].input_ids))
    stop, pad = stop_and_pad_ids(bundle)
    # rows whose prompts are padded in the middle (after a shared prefix, or joining a running batch) need
    # position ids that follow the attention mask, which `generate` passes only to a forward that declares them
    positions = "position_ids" in inspect.signature(model.forward).parameters
    shared = _shared_prefix([e.input_ids for e in encoded], fmt.image_token_id) if positions else []
    prefix_cache = None
    if shared:
        with torch.inference_mode():
            prefix_cache = model(input_ids=torch.tensor([shared]), use_cache=True, logits_to_keep=1).cache
    if decoding.do_sample:
        torch.manual_seed(decoding.seed)
    # the image placeholder is not a word: a VLM whose tied embeddings give it a high logit would otherwise emit it
    # and then be fed an image token without an image
    suppress = [fmt.image_token_id] if fmt.image_token_id is not None else None
    step = functools.partial(_step, model, decoding=decoding, stop=stop, pad=pad, suppress=suppress)
    out: list[str] = [""] * len(prompts)

    def finish(done: dict[int, list[int]]) -> None:
        for i, tokens in done.items():
            out[i] = bundle.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if on_done is not None and done:
            on_done({i: out[i] for i in done})
        if progress is not None and done:
            progress(len(done))

    rows = None
    while pending or rows is not None:
        room = batch_size - (0 if rows is None else len(rows.index))
        if pending and (rows is None or (room >= max(1, batch_size // 2) and positions and _mergeable(rows))):
            lengths = [len(encoded[i].input_ids) - len(shared) for i in pending[:room]]
            take = _joining(pending[:room], lengths)
            pending = pending[len(take):]
            # prompts of very different lengths are prefilled apart (one token each), then decode as one batch
            parts = _prefill_parts(lengths[:len(take)]) if positions else [len(take)]
            start = 0
            for size in parts:
                if rows is not None and not _mergeable(rows):  # a cache that cannot be merged: the rest waits
                    pending = take[start:] + pending
                    break
                part = take[start:start + size]
                start += size
                fresh, done = step(_start(fmt, [encoded[i] for i in part], part, shared, prefix_cache, pad),
                                   new_tokens=1 if len(parts) > 1 else SEGMENT_TOKENS)
                finish(done)
                if fresh is not None:  # a group that finished at once leaves the running rows as they are
                    rows = fresh if rows is None else _merge(rows, fresh, pad)
            continue
        rows, done = step(rows)
        finish(done)
    return out


SEGMENT_TOKENS = 8
# padded prompt tokens one prefill may take: few enough that one long prompt (HarmBench's contextual behaviours run
# to 800 tokens) does not pad 31 short ones to its length (on 2 cores 2048, 4096 and 8192 timed alike on the study
# suite: 48-53 s, against 78 s with no cap and one generation per benchmark and condition)
PREFILL_TOKENS = 4096


# a prefill apart costs about as much as this many padded prompt tokens (a `generate` call and a merge; measured
# on 2 cores): a group is split where the padding it saves is worth more
PREFILL_PART_TOKENS = 256


def _prefill_parts(lengths: list[int]) -> list[int]:
    """Sizes of the runs (in order) that a group of prompts of ascending `lengths` is prefilled in: those that
    minimise padded tokens + PREFILL_PART_TOKENS per run. One long HarmBench context among short prompts pads
    them all to its length; split, each run is padded to its own longest (quick study suite: 22% of the prefill
    tokens were padding)."""
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):  # best[end]: the cheapest split of the first `end` prompts
        for begin in range(end):
            cost = best[begin] + (end - begin) * lengths[end - 1] + PREFILL_PART_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    sizes, end = [], n
    while end > 0:
        sizes.append(end - cut[end])
        end = cut[end]
    return sizes[::-1]


def _joining(candidates: list[int], lengths: list[int]) -> list[int]:
    """The first of `candidates` (ascending length) whose prefill, padded to the longest, fits PREFILL_TOKENS;
    at least one."""
    k = len(candidates)
    while k > 1 and k * lengths[k - 1] > PREFILL_TOKENS:
        k -= 1
    return candidates[:k]


def set_precision(bundle, dtype: str):
    """Casts the bundle's model to `dtype` (fp32 | bf16) where it is not already; returns the model.

    Whole-model bf16, not autocast: decoding is bound by reading the weights once per token, and autocast would
    read fp32 weights and cast them at every step (measured: naive decoding 3.6x slower than whole-model bf16).
    The fingerprint (the cache key) is taken first, so it stays the fingerprint of the weights as loaded.
    In bf16 the matmuls and the KV cache are bf16, while the residual stream, the final norm and the logits that
    decide the next token stay fp32 (`vlsafe.precision.mixed_bf16`)."""
    from vlsafe.allocator import tune as tune_allocator
    from vlsafe.precision import mixed_bf16, torch_dtype

    if dtype not in ("fp32", "bf16"):
        raise VlsafeError(f"generation dtype {dtype!r}: fp32 or bf16 (resolve 'auto' with vlsafe.precision)")
    wanted = torch_dtype(dtype)
    tune_allocator(next(bundle.model.parameters()).device.type)
    if next(bundle.model.parameters()).dtype != wanted:
        model_fingerprint(bundle)
        bundle.model.to(wanted)
    mixed_bf16(bundle.model, on=dtype == "bf16")
    rows_last_linear(bundle.model, on=dtype == "fp32" and next(bundle.model.parameters()).device.type == "cpu")
    return bundle.model


# rows of a linear layer's input up to which `rows_last_linear` computes W @ x.T: decoding's shapes (one to a few
# hundred rows against a whole weight matrix); above it F.linear is as fast (see `vlsafe bench eval`)
SKINNY_ROWS = 256


def rows_last_linear(model, on: bool) -> None:
    """Computes the model's fp32 `nn.Linear` layers as (W @ x.T).T when an input has few rows and no gradient is
    wanted (`on=False` restores them): the same product and sums, in the operand order that CPU BLAS runs fast.

    Why: a decode step multiplies 1-256 rows by every weight matrix. F.linear (x @ W.T) reaches 20-40 GFLOP/s on
    such shapes on a 2-core AMD EPYC with a 66 GFLOP/s peak (the LM head, [32, 576] x [576, 49152], 21), and the
    same product as W @ x.T 40-60 (the LM head 43); at a thousand rows and more both run at the peak. Batched
    greedy decoding of SmolLM2-135M: 43 -> 55 new tokens/s, the same 32 answers. Training is left alone: the
    swap applies only where gradients are off (generation runs under inference mode)."""
    from vlsafe.model.linear import swap_linear_forwards

    swap_linear_forwards(model, _linear_rows_last, on)


def _linear_rows_last(module, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    if torch.is_grad_enabled() or rows > SKINNY_ROWS or x.dtype != torch.float32 or x.dim() < 2:
        return torch.nn.functional.linear(x, module.weight, module.bias)
    y = (module.weight @ x.reshape(rows, x.shape[-1]).T).T.reshape(*x.shape[:-1], module.weight.shape[0])
    return y if module.bias is None else y + module.bias


@dataclass
class _Rows:
    """The unfinished rows of a batch: token ids so far, attention mask, KV cache of all positions but the last,
    and per row the prompt's index, the answer tokens so far and (until the first step) the images."""
    ids: torch.Tensor
    mask: torch.Tensor
    cache: object
    index: list[int]
    new: list[list[int]]
    images: dict


def _start(fmt, encoded, index, shared, prefix_cache, pad) -> _Rows:
    rest = [dataclasses.replace(e, input_ids=e.input_ids[len(shared):], labels=e.labels[len(shared):])
            for e in encoded]
    batch = fmt.collate(rest, padding_side="left")
    batch.pop("labels")
    ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
    cache = None
    if shared:  # [shared prefix | padding | rest of the prompt]
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(index))
        ids = torch.cat([torch.tensor([shared]).expand(len(index), -1), ids], dim=1)
        mask = torch.cat([torch.ones(len(index), len(shared), dtype=mask.dtype), mask], dim=1)
    return _Rows(ids, mask, cache, list(index), [[] for _ in index], batch)


def _step(model, rows: _Rows, decoding: Decoding, stop: list[int], pad: int, suppress: list[int] | None = None,
          new_tokens: int = SEGMENT_TOKENS):
    """One segment of `new_tokens` tokens for every row: (the unfinished rows or None, {prompt index: answer
    tokens} of the finished)."""
    budget = decoding.max_new_tokens - max(len(tokens) for tokens in rows.new)
    with torch.inference_mode():
        result = model.generate(input_ids=rows.ids, attention_mask=rows.mask, cache=rows.cache, **rows.images,
                                **{**decoding.kwargs(), "max_new_tokens": min(new_tokens, budget)},
                                eos_token_id=stop, pad_token_id=pad, suppress_tokens=suppress,
                                return_dict_in_generate=True)
    seqs, width = result.sequences, rows.ids.shape[1]
    keep, done = [], {}
    for r, i in enumerate(rows.index):
        tokens = seqs[r, width:].tolist()
        ended = next((k for k, t in enumerate(tokens) if t in stop), None)
        rows.new[r] += tokens if ended is None else tokens[:ended + 1]  # decoded like `generate`'s own output
        if ended is None and len(rows.new[r]) < decoding.max_new_tokens:
            keep.append(r)
        else:
            done[i] = rows.new[r]
    if not keep:
        return None, done
    mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.index), seqs.shape[1] - width)], dim=1)
    if len(keep) < len(rows.index):
        result.cache.batch_select_indices(torch.tensor(keep))
    # the images are in the cache now; its last position is the next segment's first input
    return _Rows(seqs[keep], mask[keep], result.cache, [rows.index[r] for r in keep], [rows.new[r] for r in keep],
                 {}), done


def _mergeable(rows: _Rows) -> bool:
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in rows.cache.layers)


def _merge(a: _Rows, b: _Rows, pad: int) -> _Rows:
    """One batch of both: the shorter side is padded on the left, in its ids, mask and KV cache."""
    width = max(a.ids.shape[1], b.ids.shape[1])

    def left(t: torch.Tensor, dim: int, length: int, value=0) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = length - t.shape[dim]
        return torch.cat([t.new_full(shape, value), t], dim=dim)

    for la, lb in zip(a.cache.layers, b.cache.layers):  # (batch, heads, positions, head dim)
        la.keys = torch.cat([left(la.keys, 2, width - 1), left(lb.keys, 2, width - 1)])
        la.values = torch.cat([left(la.values, 2, width - 1), left(lb.values, 2, width - 1)])
    return _Rows(torch.cat([left(a.ids, 1, width, pad), left(b.ids, 1, width, pad)]),
                 torch.cat([left(a.mask, 1, width), left(b.mask, 1, width)]), a.cache, a.index + b.index,
                 a.new + b.new, {})


def _shared_prefix(prompts: list[list[int]], image_token_id: int | None) -> list[int]:
    """The tokens all prompts start with, short of any image and of each prompt's last token (which must be fed
    to get the first answer token); [] when not worth a pass of its own."""
    if len(prompts) < 2:
        return []
    shortest = min(prompts, key=len)
    n = 0
    while (n < len(shortest) - 1 and shortest[n] != image_token_id
           and all(p[n] == shortest[n] for p in prompts)):
        n += 1
    return shortest[:n] if n >= 4 else []


def stop_and_pad_ids(bundle) -> tuple[list[int], int]:
    """The tokens that end an answer (the generation config's and the tokenizer's EOS) and the padding id."""
    tokenizer = bundle.tokenizer
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    configured = _as_list(bundle.model.generation_config.eos_token_id)
    stop = list(dict.fromkeys(t for t in configured + [eos] if t is not None))
    return stop, eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _generate_vllm(bundle, prompts, decoding, batch_size, system, progress, on_done) -> list[str]:
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

    llm = vllm.LLM(model=str(directory), seed=decoding.seed,
                   dtype="bfloat16" if decoding.dtype == "bf16" else "float32")
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
    texts = [o.outputs[0].text.strip() for o in outputs]
    if on_done is not None:
        on_done(dict(enumerate(texts)))
    if progress is not None:
        progress(len(prompts))
    return texts


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
