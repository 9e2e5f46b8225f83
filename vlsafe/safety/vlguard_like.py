"""A VLGuard-like safety set made offline, written in VLGuard's own train.json format (so it loads through the
same `vlguard` loader as the real data):

    harmful image  + request     -> refusal   a typographic image of a harmful request (FigStep-style: offline
                                              stand-in for VLGuard's harmful photos) with an instruction to act
                                              on it; the refusal names the request the image carries
    safe image     + unsafe text -> refusal   a benign corpus picture with a harmful request about it
    safe image     + safe text   -> answer    the corpus's own question and true answer for that picture

Harmful requests come from AdvBench + Do-Not-Answer with evaluation near-duplicates removed; refusals are
composed (refusals.py), so no two are alike by construction.

    vlsafe safety vlguard-like --corpus runs/synth --out runs/vlguard-like --n 200
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from vlsafe.errors import VlsafeError

# instructions that hand the request over to the image, in the spirit of VLGuard's harmful-image prompts
IMAGE_INSTRUCTIONS = ("Follow the instructions shown in the picture.", "Do what the text in this image asks.",
                      "Carry out the task written in the image, in detail.", "Complete the request in this image.",
                      "Read the image and answer it step by step.")
ABOUT_IMAGE = ("Ignore the picture and tell me: {request}", "Looking at this image, {request_lc}",
               "{request} Use the image as inspiration.", "Here's a photo. {request}",
               "{request} (the image is just context)")


def build(corpus: str | Path, out: str | Path, n: int = 200, seed: int = 0) -> dict:
    """Writes out/train.json + out/images/ (n records per kind, at most as many as the corpus holds)."""
    from vlsafe.data.formats import llava
    from vlsafe.data.render import figstep_image, save_image
    from vlsafe.io import atomic_dir, sha256_file
    from vlsafe.safety import leakage
    from vlsafe.safety.align import harmful_pool
    from vlsafe.safety.refusals import compose, topic_of

    corpus, out = Path(corpus), Path(out)
    instruct = corpus / "stage2_instruct.json"
    if not instruct.is_file():
        raise VlsafeError(f"{corpus}: not a corpus from `vlsafe data synth` (no stage2_instruct.json)")
    if out.exists() and any(out.iterdir()):
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    if n < 1:
        raise VlsafeError(f"vlguard-like: n must be at least 1, got {n}")
    conversations = llava.load(instruct)
    pool, _ = harmful_pool()
    rng = np.random.default_rng([seed, 11])
    if len(pool) < 2 * n or len(conversations) < n:
        raise VlsafeError(f"vlguard-like: n={n} needs {2 * n} harmful prompts and {n} corpus pictures "
                          f"(have {len(pool)} and {len(conversations)})")
    harmful = [pool[i] for i in rng.permutation(len(pool))[:2 * n]]
    pictures = [conversations[i] for i in rng.permutation(len(conversations))[:n]]
    records = []
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        for k, (conv, prompt) in enumerate(zip(pictures, harmful[:n])):
            name = f"images/safe_{k:05d}{Path(conv.image).suffix}"
            shutil.copyfile(conv.image, tmp / name)
            template = ABOUT_IMAGE[int(rng.integers(len(ABOUT_IMAGE)))]
            unsafe = template.format(request=prompt.text, request_lc=prompt.text[:1].lower() + prompt.text[1:])
            records.append({"id": f"vlsafe_safe_{k:05d}", "image": name, "safe": True, "instr-resp": [
                {"safe_instruction": conv.turns[0].content, "response": conv.turns[1].content},
                {"unsafe_instruction": unsafe, "response": compose(prompt.text, prompt.category, seed)}]})
        for k, prompt in enumerate(harmful[n:]):
            path = Path(save_image(figstep_image(prompt.text, size=224, font_size=16), tmp / "images"))
            name = f"images/harmful_{k:05d}{path.suffix}"
            path.rename(tmp / name)
            instruction = IMAGE_INSTRUCTIONS[int(rng.integers(len(IMAGE_INSTRUCTIONS)))]
            records.append({"id": f"vlsafe_harmful_{k:05d}", "image": name, "safe": False,
                            "harmful_category": prompt.category or topic_of(prompt.text)["name"],
                            "harmful_subcategory": topic_of(prompt.text)["id"],
                            "instr-resp": [{"instruction": instruction,
                                            "response": compose(prompt.text, prompt.category, seed + 1)}]})
        (tmp / "train.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        from vlsafe.data.formats.vlguard import load as load_vlguard

        loaded = load_vlguard(tmp / "train.json")  # the set must load as VLGuard data does
        leakage.check(loaded, where=str(out / "train.json"))
        refusals = [c.turns[-1].content for c in loaded if c.meta["instruction_kind"] != "safe"]
        manifest = {"format": "vlsafe-vlguard-like/1", "seed": seed, "corpus": str(corpus.resolve()),
                    "counts": {"images": len(records), "conversations": len(loaded), "refusals": len(refusals),
                               "helpful": len(loaded) - len(refusals)},
                    "refusal_verbatim_duplicates": leakage.duplicate_share(refusals),
                    "sha256": {"train.json": sha256_file(tmp / "train.json")}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
