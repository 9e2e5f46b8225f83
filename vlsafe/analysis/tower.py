"""What a vision tower's frozen features carry about the corpus's questions: linear probes per question type.

The adapted VLM can answer an image question only if its tower's features hold the answer. For each question type
of the built-in corpus (colour, shape, count, position, words, digit) this draws fresh scenes of the kind the
held-out questions ask about (seeds apart from any corpus; digits from the training pool for fitting and from the
held-out pool for testing, as the corpus splits them), takes the tower's features at each requested layer
(every visual token, flattened, standardised) and fits a ridge classifier (regularisation chosen by
leave-one-out). Its test accuracy is what a linear read-out of that layer gets; `chance` is what always answering
the commonest test answer gets. Comparing layers says which map to feed the projector; comparing with the VLM's
held-out accuracy per type says how much of what the tower sees the VLM has learnt to say.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from vlsafe.errors import VlsafeError


def scenes(task: str, n: int, split: str, seed: int) -> tuple[list[dict], list[str]]:
    """`n` scenes of the kind `task` asks about, with the answers the held-out questions would expect (the
    corpus's own `eval_prompt`); `split` picks the digit pool."""
    from vlsafe.data import synthetic
    from vlsafe.data.synthetic_text import eval_prompt

    images, labels = synthetic._digits()
    pool = np.array([i for i in range(len(images)) if synthetic.held_out_digit(i) == (split == "eval")])
    salt = {"train": 7, "eval": 8}[split]  # streams 1 and 2 are the corpus's own: never these scenes
    drawn = [synthetic.make_scene(synthetic.EVAL_SCENE[task],
                                  np.random.default_rng([seed, salt, synthetic.TASKS.index(task), i]), pool)
             for i in range(n)]
    answers = [eval_prompt("probe", task, s, None, int(labels[s["digit_index"]]) if task == "digit" else None).answer
               for s in drawn]
    return drawn, answers


def _pixels(spec, drawn: list[dict]):
    from vlsafe.data import synthetic

    return spec.image_processor(images=[synthetic.draw(s) for s in drawn], return_tensors="pt")["pixel_values"]


def _features(spec, pixels, batch: int = 32) -> np.ndarray:
    import torch

    from vlsafe.model.towers import tower_features

    rows = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            feats = tower_features(spec.module, spec.kind, pixels[start:start + batch], spec.feature_layer,
                                   spec.select_strategy)
            rows.append(feats.float().flatten(1).numpy())
    return np.concatenate(rows)


def _fit_score(train: np.ndarray, y_train: list[str], test: np.ndarray, y_test: list[str]) -> float:
    from sklearn.linear_model import RidgeClassifierCV

    mean, scale = train.mean(0), train.std(0) + 1e-3
    classifier = RidgeClassifierCV(alphas=np.logspace(0, 5, 6)).fit((train - mean) / scale, y_train)
    return float(classifier.score((test - mean) / scale, y_test))


def probe(tower: str = "efficientnet-lite0", layers: list[int | None] | None = None, n: int = 400, seed: int = 0,
          tasks: list[str] | None = None, out: str | Path | None = None) -> dict:
    """Probe accuracy per layer and question type (n training scenes, n // 2 test scenes per type); with `out`,
    writes the new directory OUT/analysis.json. A layer None is the tower's default."""
    from vlsafe.analysis.output import header, rounded
    from vlsafe.data import synthetic
    from vlsafe.model.towers import resolve_tower

    tasks = list(tasks or synthetic.TASKS)
    unknown = [t for t in tasks if t not in synthetic.TASKS]
    if unknown:
        raise VlsafeError(f"unknown question type {unknown[0]!r} (known: {', '.join(synthetic.TASKS)})")
    if n < 10:
        raise VlsafeError(f"--n {n}: a probe needs at least 10 training scenes per question type")
    if out is not None and Path(out).exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    specs = [resolve_tower(tower, layer) for layer in (layers or [None])]  # a bad layer fails before any drawing
    data = {task: (scenes(task, n, "train", seed), scenes(task, max(5, n // 2), "eval", seed)) for task in tasks}
    chance = {task: rounded(Counter(test[1]).most_common(1)[0][1] / len(test[1]), 4)
              for task, (_, test) in data.items()}
    # every tower spec of one tower shares its image processor: each image is drawn and processed once
    pixels = {task: (_pixels(specs[0], train[0]), _pixels(specs[0], test[0])) for task, (train, test) in data.items()}
    rows = []
    for spec in specs:
        accuracy = {}
        for task, ((_, y_train), (_, y_test)) in data.items():
            train_pixels, test_pixels = pixels[task]
            accuracy[task] = rounded(_fit_score(_features(spec, train_pixels), y_train,
                                                _features(spec, test_pixels), y_test), 4)
        rows.append({"layer": spec.feature_layer, "channels": spec.hidden_size, "tokens": spec.num_image_tokens,
                     "accuracy": accuracy, "mean": rounded(np.mean(list(accuracy.values())), 4)})
    result = header("tower-probe")
    result.update({"tower": tower, "n_train": n, "n_test": max(5, n // 2), "seed": seed, "tasks": tasks,
                   "chance": chance, "chance_mean": rounded(np.mean(list(chance.values())), 4), "layers": rows})
    if out is not None:
        from vlsafe.io import atomic_dir, write_json

        with atomic_dir(Path(out)) as tmp:
            write_json(tmp / "analysis.json", result)
    return result
