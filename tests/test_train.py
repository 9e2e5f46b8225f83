"""The training engine end to end through `vlsafe train`, on pico models and a hand-made LLaVA JSON set.

Coloured squares drawn with Pillow: stage 1 learns captions ("A red square."), stage 2 answers questions about
them. Asserted: each stage lowers its loss; each changes exactly the tensors it should (others bit-identical);
an interrupted run resumes to the same weights as an uninterrupted one; two CPU processes give the weights one
gives; LoRA is saved merged; bad input exits 2 and leaves no output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlsafe.cli import main

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def _weights(run_or_model: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_or_model / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def _config(root: Path, name: str, **fields) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"warmup_ratio": 0.0, "seed": 0, **fields}))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """VLM@0 (pico) and two LLaVA JSON files over six 32x32 squares (three colours, two sizes)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("train")
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(root / "vlm0")]) == 0
    (root / "images").mkdir()
    captions, instruct = [], []
    for i, (colour, rgb) in enumerate([*COLOURS.items(), *COLOURS.items()]):
        image = Image.new("RGB", (32, 32), (255, 255, 255))
        side = 24 if i < 3 else 14
        ImageDraw.Draw(image).rectangle([4, 4, 4 + side, 4 + side], fill=rgb)
        image.save(root / "images" / f"{i}.png")
        size = "large" if i < 3 else "small"
        captions.append({"id": f"cap{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": f"A {size} {colour} square on a white background."}]})
        instruct.append({"id": f"ins{i}", "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "What colour is the square?\n<image>"},
            {"from": "gpt", "value": f"{colour.capitalize()}."},
            {"from": "human", "value": "Is it large or small?"},
            {"from": "gpt", "value": f"It is {size}."}]})
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "instruct.json").write_text(json.dumps(instruct))
    return root


@pytest.fixture(scope="module")
def adapted(work) -> tuple[Path, Path]:
    """Stage 1 (projector) from VLM@0, then stage 2 (full, with accumulation) from stage 1's final model."""
    stage1 = _config(work, "stage1", stage="projector", model=str(work / "vlm0"), data=str(work / "captions.json"),
                     out=str(work / "s1"), lr=2e-2, batch_size=6, max_steps=8)
    assert main(["train", str(stage1), "--no-progress"]) == 0
    stage2 = _config(work, "stage2", stage="full", model=str(work / "s1" / "final"),
                     data=str(work / "instruct.json"), out=str(work / "s2"), lr=3e-3, batch_size=6, grad_accum=2,
                     max_steps=8)
    assert main(["train", str(stage2), "--no-progress"]) == 0
    return work / "s1", work / "s2"


def test_each_stage_lowers_its_loss(adapted):
    # stage 1 moves only 16 image-token embeddings into a frozen random LM: a small but certain drop (~0.05);
    # stage 2 trains the LM itself (~0.8). The runs are seeded, so these numbers do not wander.
    for run, drop in zip(adapted, (0.03, 0.4)):
        losses = _losses(run)
        assert len(losses) == 8
        assert losses[-1] < losses[0] - drop, (run.name, losses)


def test_each_stage_changes_exactly_its_parameters(work, adapted):
    stage1, stage2 = adapted
    before, after1, after2 = _weights(work / "vlm0"), _weights(stage1 / "final"), _weights(stage2 / "final")
    assert set(before) == set(after1) == set(after2)
    for name in before:
        changed1 = not torch.equal(before[name], after1[name])
        changed2 = not torch.equal(after1[name], after2[name])
        assert changed1 == name.startswith("projector."), f"stage 1: {name}"
        assert changed2 == name.startswith(("projector.", "language_model.")), f"stage 2: {name}"


def test_run_records_config_checkpoints_and_logs(work, adapted):
    _, stage2 = adapted
    saved = yaml.safe_load((stage2 / "config.yaml").read_text())
    assert saved["lr"] == 3e-3 and saved["provenance"]["data"][0]["records"] == 6
    assert len(saved["provenance"]["data"][0]["sha256"]) == 64 and saved["provenance"]["versions"]["torch"]
    assert saved["provenance"]["allocator"].startswith("heap (no mmap, no trim")  # CPU run: vlsafe/allocator.py
    rows = [json.loads(line) for line in (stage2 / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert list((stage2 / "tb").glob("events.out.tfevents.*"))
    # the final model loads as a VLM and carries where it came from
    meta = json.loads((stage2 / "final" / "vlsafe.json").read_text())
    assert meta["provenance"]["stage"] == "full" and meta["provenance"]["steps"] == 8


@pytest.mark.parametrize("dtype, lora", [("fp32", None), ("bf16", None),
                                         # LoRA dropout draws from torch's generator: its state must resume too
                                         ("fp32", {"r": 4, "alpha": 8, "dropout": 0.3})])
def test_resume_after_interruption_equals_uninterrupted(work, monkeypatch, request, dtype, lora):
    from vlsafe import precision

    native = pytest.MonkeyPatch()  # a patch of its own: the test undoes `monkeypatch` on the way
    native.setattr(precision, "cpu_has_bf16", lambda: True)  # emulated where the CPU lacks it: pico is tiny
    request.addfinalizer(native.undo)
    fields = dict(stage="full", model=str(work / "vlm0"), data=str(work / "instruct.json"), lr=3e-3, batch_size=2,
                  grad_accum=2, max_steps=6, save_every=3, warmup_ratio=0.2, dtype=dtype, lora=lora)
    dtype = dtype + ("-lora" if lora else "")
    straight = _config(work, f"straight-{dtype}", out=str(work / f"straight-{dtype}"), **fields)
    assert main(["train", str(straight), "--no-progress"]) == 0

    from vlsafe.train import checkpoints

    real_save = checkpoints.save_training_state

    def killed_at_step_6(save_state, path):
        if ".step-6.partial" in str(path):
            raise KeyboardInterrupt  # half-way through writing the step-6 checkpoint: its model files are there
        real_save(save_state, path)

    run = work / f"interrupted-{dtype}"
    interrupted = _config(work, f"interrupted-{dtype}", out=str(run), **fields)
    monkeypatch.setattr(checkpoints, "save_training_state", killed_at_step_6)
    assert main(["train", str(interrupted), "--no-progress"]) == 130
    monkeypatch.undo()
    assert (run / "checkpoints" / "step-3" / "trainer_state.json").is_file()
    assert (run / "checkpoints" / ".step-6.partial" / "model.safetensors").is_file()
    assert not (run / "checkpoints" / "step-6").exists() and not (run / "final").exists()
    # the training state is safetensors and JSON: nothing a resume would have to unpickle
    names = {p.name for p in (run / "checkpoints" / "step-3").rglob("*") if p.is_file()}
    assert not [n for n in names if n.endswith((".pkl", ".bin", ".pt", ".pth"))], names
    assert {"optimizer.safetensors", "optimizer.json", "scheduler.json", "rng-0.json"} <= names

    # a different config must not continue this run
    assert main(["train", str(interrupted), "lr=1e-3", "--no-progress"]) == 2
    import pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a resume unpickled something")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    assert main(["train", str(interrupted), "--no-progress"]) == 0
    monkeypatch.undo()
    assert not (run / "checkpoints" / ".step-6.partial").exists()
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == list(range(1, 7))
    a, b = _weights(work / f"straight-{dtype}" / "final"), _weights(run / "final")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert _losses(work / f"straight-{dtype}") == pytest.approx(_losses(run), abs=1e-6)
    assert json.loads((run / "final" / "vlsafe.json").read_text())["provenance"]["precision"] == fields["dtype"]


def test_adding_lora_prints_no_deprecation_warning():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: that FutureWarning is
    filtered where vlsafe adds LoRA, so it does not fill every LoRA stage's log."""
    import warnings

    from vlsafe.model import checkpoint
    from vlsafe.train.config import LoraSpec
    from vlsafe.train.stages import _add_lora

    class Config:
        lora = LoraSpec()

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = _add_lora(checkpoint.load("pico").model, Config(), is_vlm=False)
    assert any("lora_" in name for name, _ in model.named_parameters())


def test_lora_is_saved_as_plain_merged_weights(work):
    config = _config(work, "lora", stage="full", model=str(work / "vlm0"), data=str(work / "instruct.json"),
                     out=str(work / "lora"), lr=1e-2, batch_size=6, max_steps=2, save_every=2,
                     lora={"r": 4, "alpha": 8, "dropout": 0.0})
    assert main(["train", str(config), "--no-progress"]) == 0
    before, final = _weights(work / "vlm0"), _weights(work / "lora" / "final")
    assert set(final) == set(before)  # no lora_A / lora_B / base_layer keys
    for name in before:
        adapted_layer = ".self_attn." in name or ".mlp." in name
        trained = name.startswith("projector.") or (name.startswith("language_model.") and adapted_layer)
        assert (not torch.equal(before[name], final[name])) == trained, name
    # the step-2 checkpoint (merged without touching the model) equals PEFT's merge_and_unload bit for bit
    checkpoint = _weights(work / "lora" / "checkpoints" / "step-2")
    assert all(torch.equal(checkpoint[k], final[k]) for k in final)


def test_two_cpu_processes_give_the_weights_of_one(work):
    pytest.importorskip("accelerate")
    # fp32: in bf16 a micro-batch's padding (its shape) changes roundings, which Adam turns into lr-sized steps
    fields = dict(stage="full", model=str(work / "vlm0"), data=str(work / "instruct.json"), lr=3e-3, batch_size=4,
                  max_steps=3, dtype="fp32")
    one = _config(work, "one", out=str(work / "one"), **fields)
    two = _config(work, "two", out=str(work / "two"), **fields)
    assert main(["train", str(one), "--no-progress"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "vlsafe.cli", "train",
                           str(two), "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    provenance = yaml.safe_load((work / "two" / "config.yaml").read_text())["provenance"]
    assert provenance["processes"] == 2 and provenance["distributed_type"].endswith("MULTI_CPU")
    assert json.loads(done.stdout)["steps"] == 3  # one summary, from the main process
    a, b = _weights(work / "one" / "final"), _weights(work / "two" / "final")
    # the same global batches and token-weighted loss: only the order of float sums differs
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_plain_template_stage1_lowers_its_loss_and_trains_only_the_projector(work):
    config = _config(work, "plain", stage="projector", model=str(work / "vlm0"), data=str(work / "captions.json"),
                     out=str(work / "plain"), lr=2e-2, batch_size=6, max_steps=8, template="plain")
    assert main(["train", str(config), "--no-progress"]) == 0
    losses = _losses(work / "plain")
    assert losses[-1] < losses[0] - 0.03, losses
    assert yaml.safe_load((work / "plain" / "config.yaml").read_text())["template"] == "plain"
    before, after = _weights(work / "vlm0"), _weights(work / "plain" / "final")
    assert all(torch.equal(before[k], after[k]) != k.startswith("projector.") for k in before)


def test_plain_template_refuses_a_record_it_cannot_hold_before_any_output(work, capsys):
    # the instruction file's records have two exchanges each: not a caption
    config = _config(work, "plain-bad", stage="projector", model=str(work / "vlm0"), data=str(work / "instruct.json"),
                     out=str(work / "plain-bad"), lr=2e-2, batch_size=6, max_steps=2, template="plain")
    assert main(["train", str(config), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "record 'ins0': template 'plain' needs an image and one request with one answer" in error, error
    assert not (work / "plain-bad").exists()


@pytest.mark.parametrize("overrides, message", [
    (["lr=-1"], "lr"),
    (["stage=bogus"], "stage"),
    (["stage=mixed"], "mix_ratio"),
    (["stage=mixed", "mix_ratio=1.5"], "mix_ratio"),
    (["data=missing.json"], "not found"),
    (["batch_size=5", "grad_accum=2"], "not divisible"),
    (["lora={r: 4}", "stage=projector"], "LoRA"),
    (["stage=full", "template=plain"], "template 'plain'"),
    (["model=pico"], "VLM"),
])
def test_bad_input_exits_2_and_leaves_no_output(work, capsys, overrides, message):
    config = _config(work, "bad", stage="projector", model=str(work / "vlm0"), data=str(work / "captions.json"),
                     out=str(work / "bad-out"), lr=1e-3, batch_size=6, max_steps=1)
    assert main(["train", str(config), *overrides, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and message in error, error
    assert not (work / "bad-out").exists()


def test_align_trains_a_text_only_llm(work, capsys):
    records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate([("How do I boil an egg?", "Simmer it for eight minutes."),
                                           ("Name a primary colour.", "Blue."),
                                           ("What is two plus two?", "Four.")])]
    (work / "text.json").write_text(json.dumps(records))
    config = _config(work, "align", stage="align", model="pico", data=str(work / "text.json"),
                     out=str(work / "align"), lr=1e-2, batch_size=3, max_steps=4)
    assert main(["train", str(config), "--no-progress"]) == 0
    losses = _losses(work / "align")
    assert losses[-1] < losses[0] - 0.5, losses
    assert json.loads((work / "align" / "final" / "config.json").read_text())["model_type"] == "llama"
    # a projector's learning rate for a model without one: one line, exit 2, nothing written
    capsys.readouterr()
    assert main(["train", str(config), "projector_lr=1e-3", "out=" + str(work / "align-plr"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "projector_lr" in error[0], error
    assert not (work / "align-plr").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "train").glob("*.yaml")))
def test_shipped_configs_validate(name):
    from vlsafe.train.config import load_train_config

    config = load_train_config(REPO / "configs" / "train" / name)
    if name.startswith("llava15_7b_stage"):
        stage1 = name.endswith("stage1.yaml")
        assert (config.stage, config.lr, config.batch_size) == (("projector", 1e-3, 256) if stage1 else
                                                                ("full", 2e-5, 128))
        assert (config.epochs, config.max_steps, config.warmup_ratio, config.weight_decay, config.max_length,
                config.dtype) == (1, None, 0.03, 0.0, 2048, "bf16")


# ----------------------------------------------------------------------------------------- precision and speed
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_both_precisions_lower_the_loss_and_record_it(work, dtype, monkeypatch):
    from vlsafe import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)  # bf16 is emulated where the CPU lacks it
    config = _config(work, f"prec-{dtype}", stage="full", model=str(work / "vlm0"), data=str(work / "instruct.json"),
                     out=str(work / f"prec-{dtype}"), lr=3e-3, batch_size=6, max_steps=6, save_every=3, dtype=dtype)
    assert main(["train", str(config), "--no-progress"]) == 0
    run = work / f"prec-{dtype}"
    losses = _losses(run)
    assert losses[-1] < losses[0] - 0.4, losses
    assert yaml.safe_load((run / "config.yaml").read_text())["provenance"]["precision"] == dtype
    for model_dir in (run / "checkpoints" / "step-3", run / "final"):
        assert json.loads((model_dir / "vlsafe.json").read_text())["provenance"]["precision"] == dtype
    # master weights stay fp32 in both: what is saved (and resumed) is never rounded to bf16
    assert {t.dtype for t in _weights(run / "final").values()} == {torch.float32}


def test_auto_picks_bf16_only_where_the_cpu_has_it_and_refuses_what_cannot_run(work, capsys, monkeypatch):
    from vlsafe import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve("auto", "cpu") == "fp32"
    config = _config(work, "no-bf16", stage="projector", model=str(work / "vlm0"), data=str(work / "captions.json"),
                     out=str(work / "no-bf16"), lr=1e-3, batch_size=6, max_steps=1)
    for dtype, message in (("bf16", "no native bf16"), ("fp16", "CUDA GPUs only")):
        assert main(["train", str(config), f"dtype={dtype}", "--no-progress"]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (work / "no-bf16").exists()
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve("auto", "cpu") == "bf16"


def _text_records(n: int = 12):
    from vlsafe.data.records import Conversation, Turn

    # lengths from a word to a paragraph, so batches of a shuffled order are padded a lot
    return [Conversation(id=f"r{i}", turns=[Turn(role="user", content="Say something " + "long " * (i * i % 23)),
                                            Turn(role="assistant", content="word " * (1 + (i * 7) % 19))])
            for i in range(n)]


def _row_losses(model, batch) -> torch.Tensor:
    """Summed target-token cross-entropy of each row, from the full head."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100,
                                                  reduction="none")
    return per_token.sum(dim=1)


def test_label_only_head_gives_the_loss_of_the_full_head(work, monkeypatch):
    from vlsafe.data import formats
    from vlsafe.model import checkpoint
    from vlsafe.train import stages
    from vlsafe.train.stages import label_only_loss

    cases = [(checkpoint.load(work / "vlm0"), formats.load("llava", work / "instruct.json")),
             (checkpoint.load("pico"), _text_records())]
    for bundle, records in cases:
        fmt = bundle.formatter(256)
        batch = fmt.collate([fmt.encode_conversation(r) for r in records], "right")
        n = (batch["labels"][:, 1:] != -100).sum()
        full = bundle.model(**batch, num_items_in_batch=n).loss
        sliced = label_only_loss(bundle.model, batch, n)
        assert float(sliced.detach()) == pytest.approx(float(full.detach()), rel=1e-5, abs=1e-6)
        # and its gradient: the same function of the weights
        grads = []
        for loss_fn in (lambda: bundle.model(**batch, num_items_in_batch=n).loss,
                        lambda: label_only_loss(bundle.model, batch, n)):
            bundle.model.zero_grad()
            loss_fn().backward()
            grads.append(bundle.model.get_output_embeddings().weight.grad.clone())
        assert torch.allclose(grads[0], grads[1], atol=1e-6)
        assert stages.takes_logits_to_keep(bundle.model)
        # the head computes logits for the target tokens only, not for every row at every kept position
        seen = []
        hook = bundle.model.get_output_embeddings().register_forward_hook(
            lambda module, args, output: seen.append(tuple(output.shape)))
        label_only_loss(bundle.model, batch, n)
        hook.remove()
        assert seen == [(int(n), bundle.model.get_output_embeddings().weight.shape[0])]
        with monkeypatch.context() as patch:  # an LM without logits_to_keep: sliced from the full head, same loss
            patch.setattr(stages, "takes_logits_to_keep", lambda model: False)
            assert float(label_only_loss(bundle.model, batch, n).detach()) == pytest.approx(float(full.detach()),
                                                                                            rel=1e-5, abs=1e-6)


def test_length_grouping_cuts_padding_and_changes_no_records_loss():
    from vlsafe.model import checkpoint
    from vlsafe.train.batches import BatchPlan, record_length

    bundle = checkpoint.load("pico")
    records = _text_records(48)
    fmt = bundle.formatter(256)
    encoded = [fmt.encode_conversation(r) for r in records]
    lengths = tuple(record_length(r) for r in records)
    plain, grouped = BatchPlan(48, 4, 1, 1, 0), BatchPlan(48, 4, 1, 1, 0, lengths)

    def padding(plan) -> int:
        return sum(len(batch) * max(len(encoded[i].input_ids) for i in batch) - sum(len(encoded[i].input_ids)
                                                                                   for i in batch)
                   for batch in plan.epoch_batches(0))

    assert padding(grouped) < padding(plain) / 2
    for epoch in (0, 1):  # every record once per epoch, in an order that is a function of (seed, epoch) only
        assert sorted(i for b in grouped.epoch_batches(epoch) for i in b) == list(range(48))
        assert grouped.epoch_batches(epoch) == BatchPlan(48, 4, 1, 1, 0, lengths).epoch_batches(epoch)
    assert grouped.micro_batches(13, 0) == [grouped.epoch_batches(1)[1]]
    # a record's loss is the same in its length-grouped batch as alone (right padding is never attended to)
    few = BatchPlan(12, 4, 1, 1, 0, lengths[:12])
    with torch.no_grad():
        for batch in few.epoch_batches(0):
            rows = _row_losses(bundle.model, fmt.collate([encoded[i] for i in batch], "right"))
            for i, value in zip(batch, rows.tolist()):
                alone = float(_row_losses(bundle.model, fmt.collate([encoded[i]], "right"))[0])
                assert value == pytest.approx(alone, rel=1e-5), i


def test_every_setting_is_documented_once_and_shown_by_help():
    from typer.testing import CliRunner

    from vlsafe.cli._app import app
    from vlsafe.train.config import TrainConfig

    assert all(field.description for field in TrainConfig.model_fields.values())
    shown = " ".join(CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output.split())
    for name, field in TrainConfig.model_fields.items():
        if name != "provenance":
            assert f"{name}: {' '.join(field.description.split())}" in shown, name


def test_the_optimizer_is_fused_adamw_with_decay_only_on_matrices():
    from vlsafe.train.config import TrainConfig
    from vlsafe.train.engine import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    config = TrainConfig(stage="full", model="pico", data=[{"path": "x.json"}], out="unused", lr=1e-3, batch_size=2,
                         weight_decay=0.1)
    optimizer, _, _ = make_optimizer(model, config, total_steps=10)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]


def test_projector_lr_gives_the_projector_its_own_learning_rate(work):
    from vlsafe.model import checkpoint
    from vlsafe.train import stages
    from vlsafe.train.config import TrainConfig
    from vlsafe.train.engine import make_optimizer

    def lrs(**fields) -> dict[str, float]:
        """Each trainable parameter's learning rate after the warm-up step, by name."""
        config = TrainConfig(stage="full", model="pico", data=[{"path": "x.json"}], out="unused", lr=1e-5,
                             batch_size=2, warmup_ratio=0.1, **fields)
        model = stages.prepare_model(checkpoint.load(work / "vlm0").model, stages.get_stage("full"), config)
        optimizer, scheduler, _ = make_optimizer(model, config, total_steps=10)
        optimizer.step()  # no gradients: nothing moves, the schedule advances past warm-up
        scheduler.step()
        group_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        named = [(n, p) for n, p in stages.plain_named_parameters(model) if p.requires_grad]
        assert len(group_of) == len(named)  # every trainable parameter in exactly one group
        return {n: group_of[id(p)] for n, p in named}

    own = lrs(projector_lr=1e-3)
    assert {n for n in own if n.startswith("projector.")} and {n for n in own if n.startswith("language_model.")}
    assert all(lr == pytest.approx(1e-3) if n.startswith("projector.") else lr == pytest.approx(1e-5)
               for n, lr in own.items())
    assert all(lr == pytest.approx(1e-5) for lr in lrs().values())  # unset: one learning rate, as before


def test_cpu_training_attention_is_eager_with_the_loss_and_gradients_of_sdpa(work, adapted):
    from vlsafe.data import formats
    from vlsafe.model import checkpoint
    from vlsafe.train import stages

    bundle = checkpoint.load(work / "vlm0")
    records = list(formats.load("llava", work / "instruct.json"))
    user, answer = records[0].turns[:2]  # a shorter record, so the batch holds padded rows: masks matter
    records.append(records[0].model_copy(update={"turns": [user, answer.model_copy(update={"content": "Red."})]}))
    fmt = bundle.formatter(256)
    batch = fmt.collate([fmt.encode_conversation(r) for r in records], "left")
    assert (batch["attention_mask"] == 0).any()
    results = {}
    # a GPU, or a CPU run longer than EAGER_MAX_LENGTH, leaves the loaded implementation (sdpa) as it is
    assert stages.training_attention(bundle.model, "cpu", stages.EAGER_MAX_LENGTH + 1) == "sdpa"
    for device in ("cuda", "cpu"):
        used = stages.training_attention(bundle.model, device, 256)
        bundle.model.zero_grad()
        loss = bundle.model(**batch).loss
        loss.backward()
        results[used] = (float(loss.detach()), bundle.model.projector.parameters().__next__().grad.clone())
    assert set(results) == {"sdpa", "eager"}
    assert results["eager"][0] == pytest.approx(results["sdpa"][0], rel=1e-5)
    assert torch.allclose(results["eager"][1], results["sdpa"][1], rtol=1e-4, atol=1e-6)
    # a CPU run records it, and the saved model loads with the implementation it was built with
    _, stage2 = adapted
    assert yaml.safe_load((stage2 / "config.yaml").read_text())["provenance"]["attention"] == "eager"
    assert checkpoint.load(stage2 / "final").model.language_model.config._attn_implementation == "sdpa"


def test_a_run_killed_while_opening_its_folder_starts_afresh_and_a_foreign_folder_is_refused(tmp_path):
    from vlsafe.errors import VlsafeError
    from vlsafe.train.checkpoints import resume_point

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)  # what `_open_run_dir` makes before config.yaml
    (out / ".config.yaml.tmp").write_text("stage: full\n")
    assert resume_point(out, {}, []) is None
    (out / "notes.txt").write_text("someone else's")
    with pytest.raises(VlsafeError, match="not a vlsafe training run"):
        resume_point(out, {}, [])
    (out / "notes.txt").unlink()
    (out / "checkpoints" / "step-2").mkdir()  # a checkpoint without config.yaml is not a leftover of opening
    with pytest.raises(VlsafeError, match="not a vlsafe training run"):
        resume_point(out, {}, [])


def test_frozen_layers_cast_once_with_the_loss_and_gradients_of_autocast(work):
    from vlsafe.data import formats
    from vlsafe.model import checkpoint
    from vlsafe.train import stages

    bundle = checkpoint.load(work / "vlm0")
    model = bundle.model
    for name, parameter in model.named_parameters():  # stage 1: the projector trains, the rest is frozen
        parameter.requires_grad_(name.startswith("projector."))
    fmt = bundle.formatter(256)
    batch = fmt.collate([fmt.encode_conversation(r) for r in formats.load("llava", work / "instruct.json")], "left")

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.detach().clone(), [p.grad.clone() for p in model.projector.parameters()]

    plain = loss_and_grads()
    assert stages.cache_frozen_casts(model, "fp32", "cpu") == 0 and stages.cache_frozen_casts(model, "bf16", "cuda") == 0
    frozen = sum(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in model.modules())
    assert stages.cache_frozen_casts(model, "bf16", "cpu") == frozen > 0
    for _ in range(2):  # the first call makes the copies, the second reads them
        cached = loss_and_grads()
        assert torch.equal(cached[0], plain[0])
        assert all(torch.equal(a, b) for a, b in zip(cached[1], plain[1]))
    # a weight written in place (a merge, a load) is cast again, not read stale
    layer = next(m for m in model.language_model.modules() if type(m) is torch.nn.Linear)
    with torch.no_grad():
        layer.weight.mul_(0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        patched = layer(torch.ones(2, layer.in_features))
    expected = torch.nn.functional.linear(torch.ones(2, layer.in_features), layer.weight.to(torch.bfloat16).float())
    assert torch.allclose(patched.float(), expected, rtol=1e-2)
    assert not torch.equal(cached[0], loss_and_grads()[0])
