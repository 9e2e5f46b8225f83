"""`vlsafe bench eval`: what batching and the cache buy, side by side, on the same model and prompts.

  naive     one `model.generate` per prompt (what a simple evaluation loop does)
  batched   vlsafe's engine: length-sorted, left-padded batches, KV cache, stop at EOS (no cache)
  cached    the engine again with a warm generation cache: a rerun generates nothing
Speed-up is naive seconds / mode seconds on the same prompts and token budget (greedy, so naive and batched write
the same answers up to float rounding from padding; `same_text_naive_vs_batched` counts exact matches).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _prompts(n: int):
    from vlsafe.eval import benchmarks

    pool = benchmarks.get("text_helpfulness").load() + [p for p in benchmarks.get("overrefusal").load()
                                                        if p.label == "benign"]
    return sorted(pool, key=lambda p: p.id)[:n]


def run(model: str = "smollm2-135m-instruct", n: int = 32, max_new_tokens: int = 32, batch_size: int = 32) -> dict:
    import torch

    from vlsafe.eval.cache import Cache
    from vlsafe.eval.generate import Decoding, generate
    from vlsafe.model import checkpoint

    bundle = checkpoint.load(model)
    prompts = _prompts(n)
    decoding = Decoding(max_new_tokens=max_new_tokens)
    tokenizer = bundle.tokenizer

    def count(texts: list[str]) -> int:
        # re-tokenised response text, capped at the budget: the same measure for every mode
        return sum(min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), max_new_tokens) for t in texts)

    generate(bundle, prompts[:2], decoding, batch_size=2)  # warm-up: first-call allocations are not throughput
    modes = {}
    fmt = bundle.formatter()
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    started = time.perf_counter()
    naive = []
    for p in prompts:
        batch = fmt.collate([fmt.encode_prompt(p.text, p.image, record_id=p.id)], padding_side="left")
        batch.pop("labels")
        with torch.inference_mode():
            seq = bundle.model.generate(**batch, **decoding.kwargs(), pad_token_id=tokenizer.pad_token_id or eos)
        naive.append(tokenizer.decode(seq[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    modes["naive"] = (time.perf_counter() - started, count(naive))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Cache(Path(tmp) / "bench.sqlite")
        started = time.perf_counter()
        batched = generate(bundle, prompts, decoding, batch_size=batch_size, cache=cache)
        modes["batched"] = (time.perf_counter() - started, count(batched))
        started = time.perf_counter()
        again = generate(bundle, prompts, decoding, batch_size=batch_size, cache=cache)
        modes["cached"] = (time.perf_counter() - started, count(again))
        cache.close()
    naive_seconds = modes["naive"][0]
    return {"model": model, "n": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "threads": torch.get_num_threads(),
            "modes": {name: {"seconds": round(s, 6), "new_tokens": t, "tokens_per_s": round(t / max(s, 1e-9), 1),
                             "speedup": round(naive_seconds / max(s, 1e-9), 2)} for name, (s, t) in modes.items()},
            "same_text_naive_vs_batched": sum(a == b for a, b in zip(naive, batched))}
