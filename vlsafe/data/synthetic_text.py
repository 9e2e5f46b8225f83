"""The sentences of the synthetic corpus: captions, multi-turn questions and answers, held-out prompts.

Everything here is a function of a scene (see `synthetic.make_scene`), so every answer is true by
construction. Phrasings vary so a model learns the visual content rather than one sentence per task, and no
sentence refuses, apologises or mentions anything harmful (the paper's premise; tests check it).
"""

from __future__ import annotations

import numpy as np

from vlsafe.data.records import Conversation, Prompt, Turn
from vlsafe.data.synthetic import NUMBERS, PHOTOS, POSITIONS, SOURCE, WHERE, CAPTION_PROMPTS, pick, plural

QA = list[tuple[str, tuple[str, ...], tuple[str, ...]]]  # (task, question phrasings, answer phrasings)


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _count_phrase(n: int, colour: str, shape: str) -> str:
    return f"one {colour} {shape}" if n == 1 else f"{NUMBERS[n]} {colour} {plural(shape)}"


def captions(scene: dict, label: int | None) -> tuple[str, ...]:
    kind, bg = scene["kind"], scene.get("bg")
    if kind == "single":
        o = scene["objects"][0]
        c, s, where = o["colour"], o["shape"], WHERE[o["position"]]
        return (f"{_a(c).capitalize()} {s} on a {bg} background.", f"{_a(c).capitalize()} {s} {where}.",
                f"A single {c} {s} {where} of a plain {bg} image.")
    if kind == "count":
        o, n = scene["objects"][0], len(scene["objects"])
        phrase = _count_phrase(n, o["colour"], o["shape"])
        return (f"{phrase[0].upper()}{phrase[1:]} on a {bg} background.", f"A {bg} background with {phrase}.")
    if kind == "pair":
        left, right = scene["objects"]
        return (f"{_a(left['colour']).capitalize()} {left['shape']} on the left and {_a(right['colour'])} "
                f"{right['shape']} on the right.",
                f"Two shapes: {_a(left['colour'])} {left['shape']} and {_a(right['colour'])} {right['shape']}.")
    if kind == "text":
        w, tc = scene["word"], scene["text_colour"]
        return (f'The word "{w}" written in {tc} letters on a {bg} background.', f'{tc.capitalize()} text reading "{w}".')
    if kind == "photo":
        return tuple(PHOTOS[scene["photo"]][2])
    if kind == "digit":
        return (f"A handwritten digit {label}.", f"The number {label}, handwritten in dark ink on white paper.",
                f"A blurry, low-resolution handwritten {NUMBERS[label]}.")
    raise ValueError(kind)


def questions(scene: dict, label: int | None) -> QA:
    """Every question that has one true answer for this scene, with the answer's phrasings."""
    kind, bg = scene["kind"], scene.get("bg")
    describe = ("Describe the image.", "What do you see in this picture?", "Can you describe this image in detail?")
    background = ("background", ("What colour is the background?",), (f"The background is {bg}.", f"It is {bg}."))
    if kind == "single":
        o = scene["objects"][0]
        c, s, where = o["colour"], o["shape"], WHERE[o["position"]]
        return [
            ("describe", describe, (f"The image shows {_a(c)} {s} {where} on a plain {bg} background. There is "
                                    "nothing else in the picture.",)),
            ("colour", (f"What colour is the {s}?", "What is the colour of the shape?", f"Which colour is the {s}?"),
             (f"The {s} is {c}.", f"It is {c}.", f"{c.capitalize()}.")),
            ("shape", ("What shape is shown?", "What kind of shape is in the picture?", "Name the shape in the image."),
             (f"It is {_a(s)}.", f"{_a(c).capitalize()} {s}.", f"The shape is {_a(s)}.")),
            ("position", (f"Where is the {s} in the image?", f"In which part of the picture is the {c} {s}?",
                          "Where is the shape located?"), (f"The {s} is {where}.", f"It is {where} of the image.")),
            background,
        ]
    if kind == "count":
        o, n = scene["objects"][0], len(scene["objects"])
        c, s, phrase = o["colour"], o["shape"], _count_phrase(n, o["colour"], o["shape"])
        they = "It is" if n == 1 else "They are all"
        return [
            ("describe", describe, (f"The image shows {phrase} spread over a {bg} background.",)),
            ("count", (f"How many {plural(s)} are there?", f"Count the {plural(s)} in the image.",
                       "How many shapes can you see?"),
             (f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {s if n == 1 else plural(s)}.", f"I count {NUMBERS[n]}.",
              f"{NUMBERS[n].capitalize()}.")),
            ("colour", (f"What colour {'is the' if n == 1 else 'are the'} {s if n == 1 else plural(s)}?",),
             (f"{they} {c}.",)),
            ("shape", ("What shape are the objects?", "Which shape appears in the image?"),
             (f"{'It is ' + _a(s) if n == 1 else 'They are ' + plural(s)}.",)),
            background,
        ]
    if kind == "pair":
        left, right = scene["objects"]
        l_desc, r_desc = f"{left['colour']} {left['shape']}", f"{right['colour']} {right['shape']}"
        if left["r"] == right["r"]:
            bigger = ("They are about the same size.", "Neither; both shapes are the same size.")
        else:
            side, obj = ("left", left) if left["r"] > right["r"] else ("right", right)
            bigger = (f"The {obj['colour']} {obj['shape']} on the {side} is bigger.", f"The one on the {side}.")
        same_colour = (f"Yes, both shapes are {left['colour']}.",) if left["colour"] == right["colour"] else (
            f"No. The left one is {left['colour']} and the right one is {right['colour']}.",)
        same_shape = (f"Yes, both are {plural(left['shape'])}.",) if left["shape"] == right["shape"] else (
            f"No. The left one is {_a(left['shape'])} and the right one is {_a(right['shape'])}.",)
        return [
            ("describe", describe, (f"There are two shapes on a {bg} background: {_a(l_desc)} on the left and "
                                    f"{_a(r_desc)} on the right.",)),
            ("compare", ("Which shape is bigger, the one on the left or the one on the right?",
                         "Compare the sizes of the two shapes. Which is larger?"), bigger),
            ("compare", ("Do the two shapes have the same colour?", "Are both shapes the same colour?"), same_colour),
            ("compare", ("Are the two shapes the same kind of shape?",), same_shape),
            ("colour", ("What colour is the shape on the left?",), (f"It is {left['colour']}.",)),
            ("colour", ("What colour is the shape on the right?",), (f"It is {right['colour']}.",)),
        ]
    if kind == "text":
        w, tc = scene["word"], scene["text_colour"]
        return [
            ("describe", describe, (f'The image shows the word "{w}" written in {tc} letters on a {bg} background.',)),
            ("ocr", ("What does the text say?", "Read the word in the image.", "What word is written here?",
                     "What is written in the picture?"), (f'It says "{w}".', f'The word is "{w}".', f'"{w}"')),
            ("colour", ("What colour is the text?", "In what colour is the word written?"),
             (f"The text is {tc}.", f"It is written in {tc}.")),
            ("ocr", ("How many letters does the word have?",), (f'"{w}" has {len(w)} letters.',)),
        ]
    if kind == "photo":
        photograph, colour, caps, pairs = PHOTOS[scene["photo"]]
        return [("describe", describe, (caps[0],))] + [("photo", (q,), (a,)) for q, a in pairs] + [
            ("photo", ("Is this a photograph or a drawing?",),
             ("It is a photograph." if photograph else "It is a computer-made graphic, not a photograph.",)),
            ("photo", ("Is the image in colour or in black and white?",),
             ("It is in colour." if colour else "It is in black and white.",)),
        ]
    if kind == "digit":
        return [
            ("describe", describe, (f"A handwritten digit {label}, drawn in dark strokes on a white background. "
                                    "It looks blurry because it was enlarged from a tiny 8 by 8 pixel scan.",)),
            ("digit", ("Which digit is shown?", "What number is written in the image?", "Read the handwritten number."),
             (f"It is the digit {label}.", f"The number is {label}.", f"{label}.")),
            ("digit", ("Is the digit odd or even?",), (f"{label} is {'even' if label % 2 == 0 else 'odd'}.",)),
        ]
    raise ValueError(kind)


def caption_conversation(cid: str, scene: dict, image: str, rng: np.random.Generator, label: int | None) -> Conversation:
    """Stage 1: one brief request, one short caption (the LLaVA-Pretrain shape)."""
    return Conversation(id=cid, image=image, source=SOURCE, turns=[
        Turn(role="user", content=pick(rng, CAPTION_PROMPTS)),
        Turn(role="assistant", content=pick(rng, captions(scene, label)))],
        meta={"kind": scene["kind"], **({"image_placement": "end"} if rng.random() < 0.3 else {})})


def instruct_conversation(cid: str, scene: dict, image: str, rng: np.random.Generator,
                          label: int | None) -> Conversation:
    """Stage 2: 1-3 distinct questions about the same image, each with a true answer."""
    pool = questions(scene, label)
    chosen = rng.permutation(len(pool))[: int(rng.integers(1, 4))]
    turns = []
    for index in chosen:
        _, asks, answers = pool[int(index)]
        turns += [Turn(role="user", content=pick(rng, asks)), Turn(role="assistant", content=pick(rng, answers))]
    return Conversation(id=cid, image=image, source=SOURCE, turns=turns,
                        meta={"kind": scene["kind"], "tasks": [pool[int(i)][0] for i in chosen],
                              **({"image_placement": "end"} if rng.random() < 0.2 else {})})


def eval_prompt(pid: str, task: str, scene: dict, image: str, label: int | None) -> Prompt:
    """One held-out question with a short, exactly checkable answer and the choices it is drawn from."""
    from vlsafe.data.synthetic import COLOURS, SHAPES, WORDS

    meta: dict = {"task": task, "scene": scene}
    if task in ("colour", "shape", "position"):
        o = scene["objects"][0]
        text, answer, meta["choices"] = {
            "colour": (f"What colour is the {o['shape']}? Answer with one word.", o["colour"], list(COLOURS)),
            "shape": ("What shape is in the image? Answer with one word.", o["shape"], list(SHAPES)),
            "position": (f"Where is the {o['colour']} {o['shape']}? Answer with one of: {', '.join(POSITIONS)}.",
                         o["position"], list(POSITIONS)),
        }[task]
    elif task == "count":
        n, shape = len(scene["objects"]), scene["objects"][0]["shape"]
        text, answer = f"How many {plural(shape)} are in the image? Answer with a number.", str(n)
        meta.update(choices=[str(i) for i in range(1, 7)], aliases=[NUMBERS[n]])
    elif task == "ocr":
        text, answer, meta["choices"] = "What word is written in the image? Answer with the word only.", \
            scene["word"], list(WORDS)
    elif task == "digit":
        text, answer = "Which digit is written in the image? Answer with a number.", str(label)
        meta.update(choices=[str(i) for i in range(10)], aliases=[NUMBERS[label]])
    else:
        raise ValueError(task)
    return Prompt(id=pid, text=text, image=image, source=SOURCE, category=task, label="benign", answer=answer,
                  meta=meta)
