"""Offline on-policy preference pairs for DPO, from the model that will be tuned:

    harmful prompt -> chosen = a composed refusal        rejected = the model's own compliant sample
    benign prompt  -> chosen = the model's own answer    rejected = a composed refusal of that benign prompt

On-policy rejected answers are what the model actually does wrong, so DPO pushes against its real failure; the
benign half (including benign-but-scary prompts) pushes against over-refusal, which post-hoc safety tuning is
known to add. Samples the model itself refused (harmful) or refused to answer (benign) make no pair: they would
teach nothing or the wrong thing. With `images` (a `vlsafe data synth` corpus) and a VLM, every other pair
carries an unrelated benign picture, so the pairs cover both the text-only and the with-image condition.

    vlsafe safety pairs --model runs/vlm-adapted/final --out runs/pairs --n-harmful 100 [--images runs/synth]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlsafe.data.records import PreferencePair, Prompt
from vlsafe.errors import VlsafeError


def build(model: str, out: str | Path, n_harmful: int = 100, n_benign: int = 60, seed: int = 0,
          max_new_tokens: int = 64, images: str | Path | None = None, cache_path: str | None = None,
          show_progress: bool = True) -> dict:
    from vlsafe.eval.cache import Cache
    from vlsafe.eval.generate import Decoding, generate
    from vlsafe.eval.judges import get as judge
    from vlsafe.io import atomic_dir, sha256_file
    from vlsafe.model import checkpoint
    from vlsafe.progress import Steps
    from vlsafe.safety import jsonl, leakage
    from vlsafe.safety.align import balanced_sample, benign_prompts, harmful_pool
    from vlsafe.safety.refusals import compose

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    bundle = checkpoint.load(model)
    pictures = _pictures(images) if images is not None else []
    if pictures and not bundle.is_vlm:
        raise VlsafeError(f"{model}: --images needs a VLM; this is a text-only LLM")
    pool, _ = harmful_pool()
    harmful = balanced_sample(pool, n_harmful, seed)
    benign = benign_prompts()
    rng = np.random.default_rng([seed, 13])
    benign = [benign[i] for i in rng.permutation(len(benign))[:n_benign]]
    prompts = [_with_image(p, pictures, k) for k, p in enumerate(harmful + benign)]

    cache = Cache(cache_path)
    try:
        with Steps("generate", len(prompts), unit="items", enabled=show_progress) as bar:
            # harmful: sampled, so the rejected answer is one the model plausibly gives, not only its greedy one
            sampled = generate(bundle, prompts[:len(harmful)], Decoding(max_new_tokens, do_sample=True, seed=seed),
                               cache=cache, progress=bar.advance)
            # greedy: the same answers at any batch up to near-ties, so as wide as the study's evaluation (the
            # sampled ones keep the default batch: which rows share a step decides their random draws)
            greedy = generate(bundle, prompts[len(harmful):], Decoding(max_new_tokens), batch_size=64, cache=cache,
                              progress=bar.advance)
    finally:
        cache.close()
    refusal_judge = judge("refusal-patterns")
    pairs, skipped = [], {"harmful_refused": 0, "benign_refused": 0}
    for prompt, answer in zip(prompts[:len(harmful)], sampled):
        if not answer.strip() or refusal_judge.judge(prompt.text, answer).refused:
            skipped["harmful_refused"] += 1
            continue
        pairs.append(PreferencePair(id=f"pair-{prompt.id}", prompt=prompt.text, image=prompt.image,
                                    chosen=compose(prompt.text, prompt.category, seed), rejected=answer,
                                    source=prompt.source, meta={"kind": "harmful"}))
    for prompt, answer in zip(prompts[len(harmful):], greedy):
        if not answer.strip() or refusal_judge.judge(prompt.text, answer).refused:
            skipped["benign_refused"] += 1
            continue
        pairs.append(PreferencePair(id=f"pair-{prompt.id}", prompt=prompt.text, image=prompt.image, chosen=answer,
                                    rejected=compose(prompt.text, "", seed), source=prompt.source,
                                    meta={"kind": "benign", "scary": prompt.meta.get("scary", False)}))
    if not pairs:
        raise VlsafeError(f"{model}: every sample was a refusal; no pair has a preference to learn")
    leakage.check(pairs, where=str(out / "pairs.jsonl"))
    manifest = {"format": "vlsafe-pairs/1", "model": model, "seed": seed, "max_new_tokens": max_new_tokens,
                "counts": {"pairs": len(pairs), "harmful": sum(p.meta["kind"] == "harmful" for p in pairs),
                           "benign": sum(p.meta["kind"] == "benign" for p in pairs),
                           "with_image": sum(p.image is not None for p in pairs), **skipped}}
    with atomic_dir(out) as tmp:
        jsonl.save(pairs, tmp / "pairs.jsonl")
        manifest["sha256"] = {"pairs.jsonl": sha256_file(tmp / "pairs.jsonl")}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _pictures(corpus: str | Path) -> list[str]:
    folder = Path(corpus) / "images"
    found = sorted(str(p.resolve()) for p in folder.glob("train_*.png"))
    if not found:
        raise VlsafeError(f"{corpus}: no corpus images (expected images/train_*.png from `vlsafe data synth`)")
    return found


def _with_image(prompt: Prompt, pictures: list[str], k: int) -> Prompt:
    if not pictures or k % 2:
        return prompt
    return prompt.model_copy(update={"image": pictures[k // 2 % len(pictures)]})
