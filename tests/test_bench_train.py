"""`vlsafe bench train` runs both sides on the same batches in the same precision and reports MFU against a peak
measured in the same run (its numbers are for the bench, not asserted here)."""

import json

import pytest
import torch

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
    ceiling = report["matmul_ceiling"]  # the LM's own matmuls timed alone, at vlsafe's tokens per step
    assert ceiling["tokens"] == round(ours["tokens"] / ours["steps_timed"])
    assert 0 < ceiling["share"] and ceiling["flops"] > 0


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


def test_matmul_ceiling_covers_every_linear_layer_of_the_lm_and_its_products(monkeypatch):
    """Every linear layer of the LM (the head too, not the tower or projector), grouped by shape; the ceiling's
    FLOPs are each layer's products at the given rows (forward, activation gradient, weight gradient)."""
    from vlsafe.bench import limits
    from vlsafe.model import checkpoint

    model = checkpoint.build_vlm("pico", "pico").model
    shapes = limits.linear_shapes(model)
    lm = model.language_model
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(shapes.values()) == len(linears) and (lm.config.hidden_size, lm.config.vocab_size) in shapes
    assert sum(k * n * c for (k, n), c in shapes.items()) == sum(m.weight.numel() for m in linears)
    timed = []

    def rate(m, k, n, *args, **kwargs):  # the square matmul runs at 4 GFLOP/s, every layer's product at 1
        timed.append((m, k, n))
        return 4e9 if (m, k, n) == (32, 32, 32) else 1e9

    monkeypatch.setattr(limits, "matmul_rate", rate)
    ceiling = limits.matmul_ceiling(model, 7, torch.float32, products=3, size=32, seconds=0.01)
    assert ceiling == {"tokens": 7, "flops": 1e9, "share": 0.25}
    assert len(timed) == 6 * len(shapes) and set(timed[1::2]) == {(32, 32, 32)}  # each beside a square matmul
    timed = timed[::2]
    forward, activation_grad, weight_grad = timed[::3], timed[1::3], timed[2::3]
    assert [(k, n) for _, k, n in forward] == list(shapes) and {m for m, _, _ in forward + activation_grad} == {7}
    assert [(k, n) for _, n, k in activation_grad] == list(shapes) and {k for _, k, _ in weight_grad} == {7}
    # a frozen layer's backward (stage 1) times two products per layer, not the weight gradient
    timed.clear()
    limits.matmul_ceiling(model, 7, torch.float32, products=2, size=32, seconds=0.01)
    assert len(timed) == 4 * len(shapes)
