"""`vlsafe bench train` runs both sides on the same batches in the same precision and reports MFU against a peak
measured in the same run (its numbers are for the bench, not asserted here)."""

import json

import pytest

from vlsafe.cli import main


@pytest.mark.parametrize("dtype, rounds", [("fp32", 2), ("bf16", 1)])
def test_bench_train_reports_both_sides_on_the_same_tokens(capsys, monkeypatch, dtype, rounds):
    """The fp32 case runs two rounds (the Trainer first in the second): each side pools both, each round has its
    own ratio."""
    from vlsafe import precision

    from vlsafe.model import checkpoint

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    loaded, load = [], checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    steps = 3 if rounds == 1 else 2
    assert main(["bench", "train", "--llm", "pico", "--tower", "pico", "--steps", str(steps), "--batch-size", "2",
                 "--dtype", dtype, "--peak-size", "128", "--rounds", str(rounds), "--json"]) == 0
    # both sides keep the frozen tower in eval mode (a BatchNorm tower in train mode computes another function)
    towers = [b.model.vision_tower for b in loaded if hasattr(b.model, "vision_tower")]
    assert len(towers) >= 2 and not any(t.training for t in towers)
    report = json.loads(capsys.readouterr().out)
    ours, base = report["vlsafe"], report["transformers_trainer"]
    assert ours["steps_timed"] == base["steps_timed"] == 2  # steps - 1 timed in each round
    assert len(report["rounds"]) == rounds
    for r in report["rounds"]:
        assert r["ratio"] == pytest.approx(r["vlsafe_tokens_per_s"] / r["trainer_tokens_per_s"], rel=1e-2)
    assert ours["tokens"] == base["tokens"] > 0  # same batches in the same order
    # same optimisation, step for step (in bf16, a sliced head may round a little differently from the full one)
    assert abs(ours["final_loss"] - base["final_loss"]) < (1e-4 if dtype == "fp32" else 1e-3)
    assert ours["precision"] == base["precision"] == report["precision"] == dtype
    assert report["peak"]["fp32_flops"] > 0 and report["peak"]["bf16_flops"] > 0
    assert report["allocator"].startswith("heap")  # both sides ran with the heap vlsafe sets for CPU runs
    for side in (ours, base):  # MFU = tokens/s x FLOPs per token / bf16 peak
        assert side["mfu"] == pytest.approx(side["tokens_per_s"] * report["flops_per_token"]
                                            / report["peak"]["bf16_flops"], rel=1e-2, abs=1e-4)
    assert report["ratio"] == pytest.approx(ours["tokens_per_s"] / base["tokens_per_s"], rel=1e-2)


def test_bench_train_needs_two_steps(capsys):
    assert main(["bench", "train", "--llm", "pico", "--tower", "pico", "--steps", "1"]) == 2


def test_bench_train_stage_one_trains_the_projector_alone_on_both_sides(capsys, monkeypatch):
    """`--stage projector`: both sides train the projector on the captions with the LM frozen (the same losses step
    for step), and a token counts 4 x the LM's parameters (forward, then activation gradients only)."""
    from vlsafe.model import checkpoint

    loaded, load = [], checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    assert main(["bench", "train", "--stage", "projector", "--llm", "pico", "--tower", "pico", "--steps", "3",
                 "--batch-size", "2", "--dtype", "fp32", "--peak-size", "128", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ours, base = report["vlsafe"], report["transformers_trainer"]
    assert report["stage"] == "projector" and ours["tokens"] == base["tokens"] > 0
    assert abs(ours["final_loss"] - base["final_loss"]) < 1e-4
    trainer_model = loaded[-1].model  # the Trainer's side loads last
    trained = {n.split(".")[0] for n, p in trainer_model.named_parameters() if p.requires_grad}
    assert trained == {"projector"}
    from vlsafe.bench.limits import model_params

    assert report["flops_per_token"] == 4 * model_params(trainer_model)


def test_bench_train_refuses_an_unknown_stage(capsys):
    assert main(["bench", "train", "--llm", "pico", "--tower", "pico", "--stage", "dpo"]) == 2
    assert "--stage 'dpo'" in capsys.readouterr().err
