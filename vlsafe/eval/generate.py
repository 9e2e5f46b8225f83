"""Batched generation: left padding, KV cache, stop at EOS; greedy by default, seeded sampling on request."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlsafe.data.records import Prompt


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


def generate(bundle, prompts: list[Prompt], decoding: Decoding = Decoding(), batch_size: int = 16,
             system: str | None = None, progress=None) -> list[str]:
    """One response per prompt, in order. Prompts are sorted by length so batches waste little padding."""
    fmt = bundle.formatter()
    model = bundle.model
    encoded = [fmt.encode_prompt(p.text, p.image, system=system, record_id=p.id) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i].input_ids))
    eos = bundle.tokenizer.convert_tokens_to_ids(bundle.tokenizer.eos_token)
    stop = list(dict.fromkeys([t for t in _as_list(model.generation_config.eos_token_id) + [eos] if t is not None]))
    out: list[str] = [""] * len(prompts)
    generator_seed = decoding.seed
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = fmt.collate([encoded[i] for i in idx], padding_side="left")
        batch.pop("labels")
        if decoding.do_sample:
            torch.manual_seed(generator_seed + start)
        with torch.inference_mode():
            seqs = model.generate(**batch, **decoding.kwargs(), eos_token_id=stop,
                                  pad_token_id=eos if fmt.tokenizer.pad_token_id is None else fmt.tokenizer.pad_token_id)
        new = seqs[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            out[i] = bundle.tokenizer.decode(new[row], skip_special_tokens=True).strip()
        if progress is not None:
            progress(len(idx))
    return out


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
