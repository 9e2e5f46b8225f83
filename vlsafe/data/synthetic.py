"""The built-in benign image-text corpus: what VL adaptation trains on when no LLaVA data is at hand.

The paper's premise is that safety erodes even though the adaptation data is benign, so this corpus holds
nothing harmful and no refusals: Pillow drawings (shapes, colours, counts, positions, rendered words),
scikit-image's bundled photos with true captions, and sklearn's handwritten digits, at 224x224 (the default
tower's input). Every answer is known because the scene was built from it, which makes the held-out split
checkable without a judge. Everything derives from (seed, split, index), so a corpus is the same on every run.

Layout written by `write_corpus`:
    images/*.png  stage1_captions.json  stage2_instruct.json   (LLaVA JSON, usable by LLaVA itself)
    eval_heldout.jsonl   (Prompt records with answer and meta.task)   manifest.json   (seed, counts, sha256)
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np

from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

SIZE = 224
SOURCE = "vlsafe-synth"
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 84, 214), "yellow": (240, 200, 20),
           "orange": (245, 130, 20), "purple": (130, 60, 180), "pink": (240, 110, 180), "brown": (130, 80, 40)}
TEXT_COLOURS = {"black": (20, 20, 20), **{k: COLOURS[k] for k in ("red", "blue", "green", "purple", "brown")}}
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (225, 225, 225), "cream": (250, 243, 222)}
SHAPES = ("circle", "square", "triangle", "star")
# 3x3 grid cells, row-major; a small shape sits inside its cell so its position has one true name
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
WHERE = {"top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
         "left": "on the left", "center": "in the center", "right": "on the right",
         "bottom left": "in the bottom left corner", "bottom": "at the bottom",
         "bottom right": "in the bottom right corner"}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# benign, concrete, not colour names (a colour word would make "read the text" and "what colour" collide)
WORDS = ("apple", "bread", "candle", "garden", "river", "window", "pencil", "guitar", "planet", "rabbit",
         "cloud", "forest", "island", "ladder", "mirror", "ocean", "paper", "piano", "tiger", "train",
         "lemon", "bridge", "castle", "dragon", "kitten", "market", "violin", "wallet", "basket", "button",
         "cookie", "jacket", "rocket", "summer", "winter", "spoon", "table", "chair", "house", "music")
# (photograph?, colour?, captions, question/answer pairs): every sentence checked against the picture by eye
PHOTOS = {
    "astronaut": (True, True, ["An astronaut in an orange spacesuit smiling for a portrait, with an American flag "
                               "and a model of the space shuttle behind her."],
                  [("What is the person wearing?", "She is wearing an orange spacesuit."),
                   ("Is there a flag in the picture?", "Yes, an American flag hangs behind her.")]),
    "chelsea": (True, True, ["A close-up photo of a tabby cat with green eyes."],
                [("What animal is in the photo?", "A cat."), ("What colour are the cat's eyes?", "Green.")]),
    "coffee": (True, True, ["A cup of coffee on a red saucer with a spoon, on a wooden table."],
               [("What drink is shown?", "A cup of coffee."), ("What colour is the saucer?", "It is red.")]),
    "rocket": (True, True, ["A rocket standing on its launch pad between tall towers under a dark blue evening sky."],
               [("What vehicle is shown?", "A rocket on its launch pad."),
                ("Is it day or evening?", "It looks like evening: the sky is dark blue and the lights are on.")]),
    "camera": (True, False, ["A black-and-white photo of a man in a dark coat looking through a camera on a "
                             "tripod, on a grassy field."],
               [("What is the man doing?", "He is looking through a camera mounted on a tripod.")]),
    "coins": (True, False, ["A grayscale photo of old coins laid out in rows on a dark background."],
              [("What objects are shown?", "Old coins, arranged in rows.")]),
    "moon": (True, False, ["A grayscale image of the cratered surface of the Moon."],
             [("What surface is shown?", "The rocky, cratered surface of the Moon.")]),
    "hubble_deep_field": (True, True, ["A telescope image of many small, distant galaxies on a black background."],
                          [("What are the small bright spots?", "Distant galaxies seen by a space telescope.")]),
    "immunohistochemistry": (True, True, ["A microscope image of stained tissue, with brown and blue regions."],
                             [("What kind of image is this?", "A microscope image of stained tissue.")]),
    "retina": (True, True, ["A photo of the retina at the back of an eye, with thin red vessels branching across an "
                            "orange disc."], [("What part of the body is shown?", "The retina of an eye.")]),
    "colorwheel": (False, True, ["A colour wheel on a black background, its hues blending into white at the centre."],
                   [("What is the colour at the centre of the wheel?", "White.")]),
    "brick": (True, False, ["A grayscale photo of a brick surface laid in neat rows."],
              [("What material is shown?", "Bricks.")]),
    "grass": (True, False, ["A grayscale close-up photo of grass."], [("What plant covers the ground?", "Grass.")]),
    "gravel": (True, False, ["A grayscale close-up photo of gravel."], [("What covers the ground?", "Small stones of gravel.")]),
    "cell": (True, False, ["A grayscale microscope image of a single round cell."],
             [("How many cells are visible?", "One cell.")]),
}
TASKS = ("colour", "shape", "count", "position", "ocr", "digit")
KINDS, KIND_WEIGHTS = ("single", "count", "pair", "text", "photo", "digit"), (.25, .2, .15, .15, .1, .15)
EVAL_SCENE = {"colour": "single", "shape": "single", "count": "count", "position": "single", "ocr": "text",
              "digit": "digit"}
CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short caption for this picture.",
                   "What is in this image? Answer in one sentence.", "Write a brief description of the picture.",
                   "Summarize the image in a few words.", "Provide a one-sentence caption.")


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def plural(shape: str) -> str:
    return shape + "s"


def held_out_digit(index: int) -> bool:
    """Digits split by index, independent of the seed, so no seed ever trains on an evaluation digit."""
    return index % 5 == 4


# ------------------------------------------------------------------------------------------------------ scenes
def _cell_object(rng, shape=None, colour=None, cell=None) -> dict:
    cell = int(rng.integers(9)) if cell is None else cell
    step = SIZE / 3
    cx = (cell % 3 + 0.5) * step + rng.integers(-6, 7)
    cy = (cell // 3 + 0.5) * step + rng.integers(-6, 7)
    return {"shape": shape or pick(rng, SHAPES), "colour": colour or pick(rng, list(COLOURS)),
            "cx": int(cx), "cy": int(cy), "r": int(rng.integers(16, 31)), "position": POSITIONS[cell]}


def _scatter(rng, count: int, shape: str, colour: str) -> list[dict]:
    """`count` objects that neither touch nor leave the frame, so each is one connected blob."""
    for radius_hi in (19, 15, 12):
        placed: list[dict] = []
        for _ in range(400):
            r = int(rng.integers(10, radius_hi))
            cx, cy = (int(v) for v in rng.integers(r + 6, SIZE - r - 6, size=2))
            if all((cx - o["cx"]) ** 2 + (cy - o["cy"]) ** 2 > (r + o["r"] + 8) ** 2 for o in placed):
                placed.append({"shape": shape, "colour": colour, "cx": cx, "cy": cy, "r": r})
                if len(placed) == count:
                    return placed
    raise RuntimeError(f"could not place {count} shapes")  # unreachable for count <= 9 on 224x224


def make_scene(kind: str, rng: np.random.Generator, digit_pool: np.ndarray) -> dict:
    """A JSON-able description of one image; drawing and every sentence about it derive from this alone."""
    bg = pick(rng, list(BACKGROUNDS))
    if kind == "single":
        return {"kind": kind, "bg": bg, "objects": [_cell_object(rng)]}
    if kind == "count":
        return {"kind": kind, "bg": bg, "objects": _scatter(rng, int(rng.integers(1, 7)), pick(rng, SHAPES),
                                                             pick(rng, list(COLOURS)))}
    if kind == "pair":
        left, right = _cell_object(rng, cell=3), _cell_object(rng, cell=5)
        if rng.random() < 0.5:  # same size, or clearly different: "bigger" must have one true answer
            right["r"] = left["r"]
        else:
            small, big = sorted((int(rng.integers(14, 20)), int(rng.integers(28, 34))))
            left["r"], right["r"] = (small, big) if rng.random() < 0.5 else (big, small)
        if rng.random() < 0.3:
            right["colour"] = left["colour"]
        return {"kind": kind, "bg": bg, "objects": [left, right]}
    if kind == "text":
        size = int(rng.integers(30, 45))
        return {"kind": kind, "bg": bg, "word": pick(rng, WORDS), "font_size": size,
                "text_colour": pick(rng, list(TEXT_COLOURS)), "x": int(rng.integers(4, 64)),
                "y": int(rng.integers(4, SIZE - size - 16))}
    if kind == "photo":
        name = pick(rng, list(PHOTOS))
        scale, fx, fy = float(rng.uniform(0.85, 1.0)), float(rng.random()), float(rng.random())
        return {"kind": kind, "photo": name, "crop": [round(scale, 4), round(fx, 4), round(fy, 4)]}
    if kind == "digit":
        return {"kind": kind, "digit_index": int(pick(rng, digit_pool))}
    raise ValueError(kind)


@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


@functools.cache
def _photo(name: str):
    import skimage.data
    from PIL import Image

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    scale = 320 / min(image.size)  # shrink once, so per-item crops cost a millisecond, not thirty
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


@functools.cache
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":  # five points, inner radius 0.4: its fill ratio differs clearly from a triangle's
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.4 * r)
        return [(cx + float(a) * np.cos(t), cy + float(a) * np.sin(t)) for a, t in zip(radii, angles)]
    raise ValueError(shape)


def draw(scene: dict):
    """The 224x224 RGB image of a scene. Shapes are drawn without anti-aliasing: every shape pixel has exactly
    its named colour, which is what lets a test re-detect colours, counts and positions from pixels."""
    from PIL import Image, ImageDraw

    kind = scene["kind"]
    if kind == "photo":
        photo = _photo(scene["photo"])
        scale, fx, fy = scene["crop"]
        side = scale * min(photo.size)
        x0, y0 = fx * (photo.width - side), fy * (photo.height - side)
        return photo.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
    if kind == "digit":
        images, _ = _digits()
        ink = (255 - images[scene["digit_index"]] * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        return Image.fromarray(ink).resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB")
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[scene["bg"]])
    pen = ImageDraw.Draw(image)
    if kind == "text":
        pen.text((scene["x"], scene["y"]), scene["word"], font=_font(scene["font_size"]),
                 fill=TEXT_COLOURS[scene["text_colour"]])
    for obj in scene.get("objects", []):
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            r = obj["r"]
            pen.ellipse((obj["cx"] - r, obj["cy"] - r, obj["cx"] + r, obj["cy"] + r), fill=fill)
        else:
            pen.polygon(shape_points(obj["shape"], obj["cx"], obj["cy"], obj["r"]), fill=fill)
    return image


# ----------------------------------------------------------------------------------------------------- writing
def write_corpus(out: str | Path, n: int = 2000, seed: int = 0, n_eval: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Writes the corpus into `out` (which must not exist or be empty) and returns its manifest.

    `n` training images, each with one stage-1 caption and one stage-2 conversation of 1-3 turns; `n_eval`
    held-out items (default max(60, n/10)), balanced over TASKS. The directory appears whole or not at all.
    """
    from vlsafe.data import synthetic_text as text  # the sentences; kept apart from the pixels
    from vlsafe.io import atomic_dir, sha256_bytes

    if n < 1:
        raise VlsafeError(f"synth: --n must be at least 1, got {n}")
    per_task = max(10, round((n_eval if n_eval is not None else n / 10) / len(TASKS)))
    images, targets = _digits()
    pool = {split: np.array([i for i in range(len(images)) if held_out_digit(i) == (split == "eval")])
            for split in ("train", "eval")}
    total = n + per_task * len(TASKS)
    files: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()

        def save_png(name: str, scene: dict) -> str:
            buffer = io.BytesIO()
            draw(scene).save(buffer, format="PNG")
            (tmp / "images" / name).write_bytes(buffer.getvalue())
            files[f"images/{name}"] = sha256_bytes(buffer.getvalue())
            if progress:
                progress(len(files), total)
            return str(tmp / "images" / name)

        captions, instruct, kinds = [], [], {k: 0 for k in KINDS}
        for i in range(n):
            rng = np.random.default_rng([seed, 1, i])
            scene = make_scene(KINDS[int(rng.choice(len(KINDS), p=KIND_WEIGHTS))], rng, pool["train"])
            kinds[scene["kind"]] += 1
            path = save_png(f"train_{i:06d}.png", scene)
            label = int(targets[scene["digit_index"]]) if scene["kind"] == "digit" else None
            captions.append(text.caption_conversation(f"synth-cap-{i:06d}", scene, path, rng, label))
            instruct.append(text.instruct_conversation(f"synth-ins-{i:06d}", scene, path, rng, label))
        prompts = []
        for j in range(per_task * len(TASKS)):
            task = TASKS[j % len(TASKS)]
            rng = np.random.default_rng([seed, 2, j])
            scene = make_scene(EVAL_SCENE[task], rng, pool["eval"])
            save_png(f"eval_{j:06d}.png", scene)
            label = int(targets[scene["digit_index"]]) if task == "digit" else None
            prompts.append(text.eval_prompt(f"synth-eval-{j:06d}", task, scene, f"images/eval_{j:06d}.png", label))

        from vlsafe.data.formats import llava

        llava.save(captions, tmp / "stage1_captions.json", tmp)
        llava.save(instruct, tmp / "stage2_instruct.json", tmp)
        (tmp / "eval_heldout.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in prompts))
        for name in ("stage1_captions.json", "stage2_instruct.json", "eval_heldout.jsonl"):
            files[name] = sha256_bytes((tmp / name).read_bytes())
        manifest = {
            "format": "vlsafe-synth/1", "seed": seed, "n": n, "image_size": SIZE,
            "counts": {"images": len([f for f in files if f.startswith("images/")]), "stage1_captions": n,
                       "stage2_conversations": n, "stage2_turns": sum(len(c.turns) // 2 for c in instruct),
                       "eval": {t: per_task for t in TASKS}, "scene_kinds": kinds},
            "versions": _versions(),
            "files": dict(sorted(files.items())),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _versions() -> dict:
    """PNG bytes and photos depend on these; recorded so a hash mismatch can be traced to an upgrade."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("vlsafe", "pillow", "numpy", "scikit-image", "scikit-learn"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def load_heldout(path: str | Path) -> list[Prompt]:
    """The held-out items of a corpus, with image paths made absolute against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise VlsafeError(f"{path}: no such file (a corpus written by `vlsafe data synth` has eval_heldout.jsonl)")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                prompt = Prompt.model_validate_json(line)
            except ValueError as err:
                raise VlsafeError(f"{path}: line {number}: not a Prompt record ({err.__class__.__name__})") from None
            out.append(prompt.model_copy(update={"image": str((path.parent / prompt.image).resolve())}))
    return out
