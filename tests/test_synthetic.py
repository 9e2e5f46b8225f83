"""The built-in benign corpus: deterministic by seed, benign, and every held-out answer true from the pixels.

Answers are re-derived from the written PNGs, not from the scene the generator kept, so a drawing bug (a shape
off its cell, touching shapes, a wrong fill colour) fails here rather than quietly mislabelling training data.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from skimage.measure import label, regionprops

from vlsafe.cli import main
from vlsafe.data import synthetic
from vlsafe.data.formats import llava

N, SEED = 120, 7
REFUSAL = re.compile(r"\b(sorry|apologi[sz]e|cannot|can't|can not|unable|as an ai|won't|will not|not able to|"
                     r"decline|refuse|inappropriate|harmful|unsafe|illegal|against (?:my|our) )", re.I)
HARMFUL = re.compile(r"\b(kill\w*|weapons?|bomb\w*|drugs?|attack\w*|shoot\w*|guns?|blood\w*|hate|hatred|steal\w*|"
                     r"knife|knives|poison\w*|explos\w*|violen\w*|suicid\w*|murder\w*|terror\w*|hack\w*|abus\w*|"
                     r"sex\w*|nude|racis\w*|slurs?|meth|cocaine)\b", re.I)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    assert main(["data", "synth", "--out", str(out), "--n", str(N), "--seed", str(SEED)]) == 0
    return out


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def all_texts(folder: Path) -> list[str]:
    texts = []
    for name in ("stage1_captions.json", "stage2_instruct.json"):
        texts += [t["value"] for r in json.loads((folder / name).read_text()) for t in r["conversations"]]
    texts += [p.text for p in synthetic.load_heldout(folder / "eval_heldout.jsonl")]
    return texts


# ------------------------------------------------------------------------------------------------ the files
def test_layout_counts_and_hashes(corpus):
    m = manifest(corpus)
    assert m["seed"] == SEED and m["n"] == N
    assert m["counts"]["stage1_captions"] == m["counts"]["stage2_conversations"] == N
    n_eval = sum(m["counts"]["eval"].values())
    assert set(m["counts"]["eval"]) == set(synthetic.TASKS) and len(set(m["counts"]["eval"].values())) == 1
    assert m["counts"]["images"] == N + n_eval == len(list((corpus / "images").glob("*.png")))
    assert all(m["counts"]["scene_kinds"][k] > 0 for k in synthetic.KINDS)
    import hashlib

    for rel, digest in m["files"].items():
        assert hashlib.sha256((corpus / rel).read_bytes()).hexdigest() == digest, rel
    first = Image.open(corpus / "images" / "train_000000.png")
    assert first.size == (224, 224) and first.mode == "RGB" and first.format == "PNG"
    assert not list(corpus.parent.glob(".*partial*")), "the temp directory was left behind"


def test_stages_are_llava_json_that_loads_back(corpus):
    stage1 = llava.load(corpus / "stage1_captions.json")
    stage2 = llava.load(corpus / "stage2_instruct.json")
    assert len(stage1) == len(stage2) == N and not stage1.skipped
    assert all(len(c.turns) == 2 and c.image for c in stage1)
    assert {len(c.turns) // 2 for c in stage2} == {1, 2, 3}
    raw = json.loads((corpus / "stage2_instruct.json").read_text())
    assert all(r["conversations"][0]["value"].count("<image>") == 1 for r in raw)
    questions = " ".join(t.content for c in stage2 for t in c.turns if t.role == "user")
    for phrase in ("Describe", "How many", "What colour", "Where is", "word", "bigger", "digit"):
        assert phrase in questions, phrase


def test_deterministic_by_seed(corpus, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    synthetic.write_corpus(again, n=N, seed=SEED)
    synthetic.write_corpus(other, n=N, seed=SEED + 1)
    assert manifest(again)["files"] == manifest(corpus)["files"]
    assert (again / "manifest.json").read_bytes() == (corpus / "manifest.json").read_bytes()
    changed = {k for k, v in manifest(other)["files"].items() if manifest(corpus)["files"].get(k) != v}
    assert len(changed) > 0.9 * len(manifest(corpus)["files"])


def test_no_refusals_and_nothing_harmful(corpus):
    texts = all_texts(corpus)
    texts += synthetic.WORDS + tuple(c for p in synthetic.PHOTOS.values() for c in p[2])
    texts += tuple(s for p in synthetic.PHOTOS.values() for qa in p[3] for s in qa)
    for text in texts:
        assert not REFUSAL.search(text), text
        assert not HARMFUL.search(text), text


# ------------------------------------------------------------------------------------- answers from pixels
def background(pixels: np.ndarray) -> np.ndarray:
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return values[counts.argmax()]


def foreground(pixels: np.ndarray) -> np.ndarray:
    return np.abs(pixels.astype(int) - background(pixels)).sum(axis=2) > 30


def read_colour(pixels):
    mean = pixels[foreground(pixels)].mean(axis=0)
    return min(synthetic.COLOURS, key=lambda name: np.abs(mean - synthetic.COLOURS[name]).sum())


def read_shape(pixels):
    region = max(regionprops(label(foreground(pixels))), key=lambda r: r.area)
    if region.solidity < 0.8:  # the star's points leave gaps in its convex hull
        return "star"
    return "square" if region.extent > 0.92 else "circle" if region.extent > 0.7 else "triangle"


def read_count(pixels):
    return str(sum(1 for r in regionprops(label(foreground(pixels), connectivity=2)) if r.area >= 10))


def read_position(pixels):
    ys, xs = np.nonzero(foreground(pixels))
    cell = 224 / 3
    rows, cols = {int(ys.min() // cell), int(ys.max() // cell)}, {int(xs.min() // cell), int(xs.max() // cell)}
    assert len(rows) == len(cols) == 1, "the shape straddles two cells, so its position has no single name"
    return synthetic.POSITIONS[rows.pop() * 3 + cols.pop()]


def read_word(pixels, scene):
    """Of all the corpus's words, only the answer redraws these exact pixels."""
    matches = []
    for word in synthetic.WORDS:
        image = Image.new("RGB", (224, 224), synthetic.BACKGROUNDS[scene["bg"]])
        ImageDraw.Draw(image).text((scene["x"], scene["y"]), word, font=synthetic._font(scene["font_size"]),
                                   fill=synthetic.TEXT_COLOURS[scene["text_colour"]])
        if np.array_equal(np.asarray(image), pixels):
            matches.append(word)
    assert len(matches) == 1, matches
    ys, xs = np.nonzero(foreground(pixels))
    assert xs.min() > 0 and xs.max() < 223 and ys.max() < 223, "text runs off the image"
    return matches[0]


def read_digit(pixels):
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = 255 - pixels.mean(axis=2)
    small = ink.reshape(8, 28, 8, 28).mean(axis=(1, 3)) * (16 / 255)
    nearest = np.abs(digits.images - small).sum(axis=(1, 2)).argmin()
    assert synthetic.held_out_digit(int(nearest)), "an evaluation digit comes from the training pool"
    return str(digits.target[nearest])


def test_heldout_answers_are_true_in_the_pixels(corpus):
    prompts = synthetic.load_heldout(corpus / "eval_heldout.jsonl")
    assert {p.meta["task"] for p in prompts} == set(synthetic.TASKS)
    readers = {"colour": read_colour, "shape": read_shape, "count": read_count, "position": read_position,
               "digit": read_digit, "ocr": None}
    for p in prompts:
        assert Path(p.image).is_absolute() and p.label == "benign" and p.answer in p.meta["choices"]
        pixels = np.asarray(Image.open(p.image).convert("RGB"))
        task = p.meta["task"]
        seen = read_word(pixels, p.meta["scene"]) if task == "ocr" else readers[task](pixels)
        assert seen == p.answer, (p.id, task, seen, p.answer)


def test_heldout_images_are_not_training_images(corpus):
    files = manifest(corpus)["files"]
    train = {v for k, v in files.items() if k.startswith("images/train_")}
    held = {v for k, v in files.items() if k.startswith("images/eval_")}
    assert train and held and not train & held


# ----------------------------------------------------------------------------------------------- CLI, mix
def test_synth_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "5"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert main(["data", "synth", "--out", str(tmp_path / "new"), "--n", "0"]) == 2
    assert not (tmp_path / "new").exists()


