"""VL adaptation on pico models teaches the VLM to see: after stage 1 + stage 2 on coloured shapes, it names the
colour of held-out images (new shades, sizes, positions, shapes) far above chance, where VLM@0 cannot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from vlsafe.cli import main
from vlsafe.data.records import Prompt

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
QUESTION = "What colour is the shape?"


def _draw(path: Path, rgb, rng: random.Random) -> None:
    """A shape filling most of the frame in a jittered shade of its colour, on a jittered light background."""
    shade = tuple(max(0, min(255, c + rng.randint(-40, 40))) for c in rgb)
    image = Image.new("RGB", (32, 32), tuple(rng.randint(200, 255) for _ in range(3)))
    side = rng.randint(24, 30)
    x, y = rng.randint(0, 32 - side), rng.randint(0, 32 - side)
    shape = ImageDraw.Draw(image).ellipse if rng.random() < 0.5 else ImageDraw.Draw(image).rectangle
    shape([x, y, x + side, y + side], fill=shade)
    image.save(path)


def _accuracy(model_dir: Path, heldout: list[tuple[str, str]]) -> float:
    from vlsafe.eval.generate import Decoding, generate
    from vlsafe.model import checkpoint

    bundle = checkpoint.load(model_dir)
    prompts = [Prompt(id=str(i), text=QUESTION, image=path) for i, (path, _) in enumerate(heldout)]
    replies = generate(bundle, prompts, Decoding(max_new_tokens=4))
    return sum(colour in reply.lower() for reply, (_, colour) in zip(replies, heldout)) / len(heldout)


def test_adapted_pico_vlm_names_held_out_colours(tmp_path):
    rng = random.Random(0)
    (tmp_path / "images").mkdir()
    train, heldout = [], []
    for i in range(48):
        colour = list(COLOURS)[i % 3]
        path = tmp_path / "images" / f"{i}.png"
        _draw(path, COLOURS[colour], rng)
        if i < 36:
            train.append({"id": str(i), "image": f"images/{i}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": f"{colour.capitalize()}."}]})
        else:
            heldout.append((str(path), colour))
    (tmp_path / "train.json").write_text(json.dumps(train))
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(tmp_path / "vlm0")]) == 0
    before = _accuracy(tmp_path / "vlm0", heldout)
    # stage 2 at lr 3e-3 for 240 steps: 1.0 on four image seeds in fp32 and in bf16 alike on an Intel Xeon with AMX;
    # at 1e-2 for 120 steps the outcome hung on the CPU's arithmetic (9 of 12 on an AMD EPYC, 8 of 12 there: blue
    # answered "Green"), at 1e-3 nothing was learnt in 240 steps
    for stage, model, out, lr, steps in [("projector", "vlm0", "s1", 1e-2, 20), ("full", "s1/final", "s2", 3e-3, 240)]:
        config = tmp_path / f"{stage}.yaml"
        config.write_text(yaml.safe_dump({"stage": stage, "model": str(tmp_path / model), "out": str(tmp_path / out),
                                          "data": str(tmp_path / "train.json"), "lr": lr, "batch_size": 12,
                                          "max_steps": steps, "warmup_ratio": 0.0, "seed": 0}))
        assert main(["train", str(config), "--no-progress"]) == 0
    after = _accuracy(tmp_path / "s2" / "final", heldout)
    assert before < 0.5 and after >= 0.75, (before, after)  # chance is 1/3
