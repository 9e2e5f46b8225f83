"""`vlsafe bench eval`: what batching and the cache buy, side by side, on the same model and prompts.

  naive     one plain `model.generate` per prompt (what a simple evaluation loop does), greedy, the same token
            budget and stop tokens
  batched   vlsafe's engine: length-sorted, left-padded batches, KV cache, finished rows dropped (no cache)
  cached    the engine again with the generation cache the batched run filled: a rerun generates nothing
Speed-up is naive seconds / mode seconds on the same prompts. Greedy, so naive and batched write the same answers up
to float rounding from padding and batch shape (`same_text_naive_vs_batched` counts exact matches); `generated`
counts the prompts that reached the model.
In bf16 the matmuls still round differently with batch shape (one prompt vs a padded batch), and a small model's
greedy answers often hinge on near-ties, so some answers part ways after a few tokens; the engine keeps the
residual stream and the top logits fp32 to make that rarer (SmolLM2-135M, 32 prompts x 64 tokens: 22 identical,
17 in whole-model bf16).

Where an answer differs, `parted` says where and why: the first token of the naive answer that the batched one
does not share, and by how much that greedy choice led the runner-up (logit difference) in a fresh unpadded pass
over the prompt and the answer before it. A lead within the precision's rounding (bf16 keeps 8 bits of mantissa:
steps of 0.125 at a logit of 20) is a near-tie that rounding tipped; a large one would be a batching bug.

Both sides generate in the same precision (`--dtype`, auto = bf16 where the hardware has it) and with the same
arithmetic (`set_precision`: in fp32 on a CPU, few-row linear layers as W @ x.T on both sides). The matmul peak
(fp32, bf16) is measured in the same run; each mode reports MFU against the bf16 peak (fp32 where the hardware
has no native bf16: limits.py), and `ratio` is batched over naive new tokens/s.

On a CPU the naive side is bound by reading every weight once per token, the batched side by arithmetic: the
ratio grows with the batch, the answer lengths and free memory bandwidth, and shrinks with prompt length (the
prompt pass costs the same on both sides). Both sides run under the same `threads`; on a machine another job
shares, one thread per free core (`--threads`) avoids threads waiting on a descheduled peer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from vlsafe.errors import VlsafeError


def _prompts(n: int):
    from vlsafe.eval import benchmarks

    pool = benchmarks.get("text_helpfulness").load() + [p for p in benchmarks.get("overrefusal").load()
                                                        if p.label == "benign"]
    return sorted(pool, key=lambda p: p.id)[:n]


def _naive(bundle, prompts, decoding, token_ids: list | None = None) -> list[str]:
    """One `model.generate` per prompt; `token_ids`, when given, receives each answer's generated token ids."""
    import torch

    from vlsafe.eval.generate import stop_and_pad_ids

    fmt, tokenizer = bundle.formatter(), bundle.tokenizer
    stop, pad = stop_and_pad_ids(bundle)
    out = []
    for p in prompts:
        batch = fmt.collate([fmt.encode_prompt(p.text, p.image, record_id=p.id)], padding_side="left")
        batch.pop("labels")
        with torch.inference_mode():
            seq = bundle.model.generate(**batch, **decoding.kwargs(), eos_token_id=stop, pad_token_id=pad,
                                        suppress_tokens=[fmt.image_token_id] if fmt.image_token_id is not None else None)
        answer = seq[0, batch["input_ids"].shape[1]:]
        if token_ids is not None:
            token_ids.append(answer.tolist())
        out.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return out


def _parted(bundle, prompts, naive_ids: list[list[int]], batched: list[str]) -> list[dict]:
    """For each prompt whose batched answer differs from the naive one: the first naive token whose text the
    batched answer does not share, and how far that greedy choice led the runner-up (its logit minus the best
    other's) in one unpadded forward pass over the prompt and the naive answer before it; both answers beside."""
    import torch

    fmt, tokenizer = bundle.formatter(), bundle.tokenizer
    rows = []
    for prompt, ids, other in zip(prompts, naive_ids, batched):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text == other:
            continue
        # the naive answer, token by token, until its text leaves the batched one (or it chose to stop)
        at = next((j for j in range(len(ids))
                   if not other.startswith(tokenizer.decode(ids[:j + 1], skip_special_tokens=True).strip())
                   or j == len(ids) - 1), None)
        if at is None:
            continue
        batch = fmt.collate([fmt.encode_prompt(prompt.text, prompt.image, record_id=prompt.id)], padding_side="left")
        batch.pop("labels")
        batch["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([ids[:at]], dtype=torch.long)], dim=1)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        with torch.inference_mode():
            logits = bundle.model(**batch).logits[0, -1].float()
        c = ids[at]
        runner_up = torch.cat([logits[:c], logits[c + 1:]]).max().item()
        rows.append({"id": prompt.id, "token": at, "lead": round(logits[c].item() - runner_up, 4),
                     "naive": text, "batched": other})
    return rows


def run(model: str = "smollm2-135m-instruct", n: int = 64, max_new_tokens: int = 32, batch_size: int = 64,
        threads: int | None = None, dtype: str = "fp32", peak_size: int = 2048) -> dict:
    import torch

    from vlsafe import precision as precisions

    if dtype == "fp16":
        raise VlsafeError("--dtype fp16 is not a generation precision (fp32, bf16 or auto)")
    precision = precisions.resolve(dtype, precisions.device_type())
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(model, n, max_new_tokens, batch_size, precision, peak_size)
    finally:
        torch.set_num_threads(before)


def _run(model: str, n: int, max_new_tokens: int, batch_size: int, precision: str, peak_size: int) -> dict:
    import torch

    from vlsafe import precision as precisions
    from vlsafe.allocator import tune as tune_allocator
    from vlsafe.bench import limits
    from vlsafe.io import machine
    from vlsafe.eval.cache import Cache
    from vlsafe.eval.generate import Decoding, generate, set_precision
    from vlsafe.model import checkpoint

    allocator = tune_allocator(precisions.device_type())  # before the peak: every side runs with the same heap
    peak = limits.peaks(peak_size, device=precisions.device_type())
    bundle = checkpoint.load(model)
    prompts = _prompts(n)
    decoding = Decoding(max_new_tokens=max_new_tokens, dtype=precision)
    set_precision(bundle, precision)  # the naive side runs in the same precision as the engine
    flops_per_token = 2 * limits.model_params(bundle.model)
    tokenizer = bundle.tokenizer

    def count(texts: list[str]) -> int:
        # re-tokenised response text, capped at the budget: the same measure for every mode
        return sum(min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), max_new_tokens) for t in texts)

    generate(bundle, prompts[:2], decoding, batch_size=2)  # warm-up: first-call allocations are not throughput
    modes = {}
    started = time.perf_counter()
    naive_ids: list[list[int]] = []
    naive = _naive(bundle, prompts, decoding, naive_ids)
    modes["naive"] = (time.perf_counter() - started, count(naive), len(prompts))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "bench.sqlite")
        for name in ("batched", "cached"):  # the second pass finds every answer the first one stored
            misses = cache.misses
            started = time.perf_counter()
            texts = generate(bundle, prompts, decoding, batch_size=batch_size, cache=cache)
            modes[name] = (time.perf_counter() - started, count(texts), cache.misses - misses)
            if name == "batched":
                batched = texts
        cache.close()
    naive_seconds = modes["naive"][0]
    report = {name: {"seconds": round(s, 6), "new_tokens": t, "tokens_per_s": round(t / max(s, 1e-9), 1),
                     "speedup": round(naive_seconds / max(s, 1e-9), 2), "generated": g, "precision": precision,
                     # a pass that read every answer from the cache computed nothing: no utilisation to report
                     "mfu": limits.mfu(t / max(s, 1e-9), flops_per_token, limits.peak_flops(peak)) if g else None}
              for name, (s, t, g) in modes.items()}
    return {"bench": "eval", "model": model, "n": len(prompts), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "machine": machine(), "allocator": allocator,
            "precision": precision,
            "peak": peak, "flops_per_token": flops_per_token, "modes": report,
            # None when the model wrote nothing to count (a random pico model writes blank answers)
            "ratio": (round(report["batched"]["tokens_per_s"] / report["naive"]["tokens_per_s"], 3)
                      if report["naive"]["tokens_per_s"] else None),
            "same_text_naive_vs_batched": sum(a == b for a, b in zip(naive, batched)),
            "parted": _parted(bundle, prompts, naive_ids, batched)}
