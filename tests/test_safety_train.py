"""Safety stages through the one engine on pico models: align, safety-sft, mixed and dpo (TRL's loss).

Asserted: each SFT stage lowers its loss and changes only what it trains; `mixed` holds the ratio it is given;
DPO's reward margin rises and the policy prefers "chosen" more often after training than before, with images and
text-only; bad preference records, a one-string refusal set and a ratio outside [0, 1] exit 2 with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlsafe.cli import main
from vlsafe.data.records import Conversation, PreferencePair, Turn


def _config(root: Path, name: str, **fields) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"warmup_ratio": 0.0, "seed": 0, **fields}))
    return path


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """VLM@0 (pico), a 24-image synth corpus and a VLGuard-like set of 8 + 8 images made from it."""
    root = tmp_path_factory.mktemp("safety")
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(root / "vlm0")]) == 0
    assert main(["data", "synth", "--out", str(root / "synth"), "--n", "24"]) == 0
    assert main(["safety", "vlguard-like", "--corpus", str(root / "synth"), "--out", str(root / "guard"),
                 "--n", "8"]) == 0
    return root


def test_vlguard_like_set_has_three_kinds_and_varied_refusals(work):
    from vlsafe.data import formats

    records = formats.load("vlguard", work / "guard" / "train.json")
    kinds = [r.meta["instruction_kind"] for r in records]
    assert (kinds.count("safe"), kinds.count("unsafe"), kinds.count("harmful_image")) == (8, 8, 8)
    refusals = [r.turns[-1].content for r in records if r.meta["instruction_kind"] != "safe"]
    assert len(set(refusals)) == len(refusals)
    assert all(Path(r.image).is_file() for r in records)


def test_safety_sft_lowers_its_loss_and_trains_projector_and_lm(work):
    config = _config(work, "sft", stage="safety-sft", model=str(work / "vlm0"),
                     data={"path": str(work / "guard" / "train.json"), "format": "vlguard"},
                     out=str(work / "sft"), lr=3e-3, batch_size=8, max_steps=6)
    assert main(["train", str(config), "--no-progress"]) == 0
    losses = [row["loss"] for row in _log(work / "sft")]
    assert losses[-1] < losses[0] - 0.3, losses
    before, after = load_file(str(work / "vlm0" / "model.safetensors")), load_file(
        str(work / "sft" / "final" / "model.safetensors"))
    for name in before:
        assert (not torch.equal(before[name], after[name])) == name.startswith(("projector.", "language_model.")), name
    provenance = yaml.safe_load((work / "sft" / "config.yaml").read_text())["provenance"]["data"][0]
    assert provenance["refusals"] == 16 and provenance["distinct_refusals"] == 16


def test_mixed_holds_its_ratio(work):
    fields = dict(stage="mixed", model=str(work / "vlm0"), lr=3e-3, batch_size=4, max_steps=3,
                  data=[{"path": str(work / "synth" / "stage2_instruct.json")},
                        {"path": str(work / "guard" / "train.json"), "format": "vlguard", "role": "safety"}])
    config = _config(work, "mixed", out=str(work / "mixed"), mix_ratio=0.25, **fields)
    assert main(["train", str(config), "--no-progress"]) == 0
    data = yaml.safe_load((work / "mixed" / "config.yaml").read_text())["provenance"]["data"]
    task, safety = data[0]["mixed_in"], data[1]["mixed_in"]
    assert (task, safety) == (24, 8) and safety / (task + safety) == 0.25
    assert _log(work / "mixed")[-1]["loss"] > 0
    bad = _config(work, "mixed-bad", out=str(work / "mixed-bad"), mix_ratio=1.5, **fields)
    assert main(["train", str(bad), "--no-progress"]) == 2
    assert not (work / "mixed-bad").exists()


def test_full_mixes_text_only_instructions_at_its_ratio(work):
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                                              {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."}]}
            for i in range(16)]
    (work / "text.json").write_text(json.dumps(text))
    fields = dict(stage="full", model=str(work / "vlm0"), lr=3e-3, batch_size=4, max_steps=3,
                  data=[{"path": str(work / "synth" / "stage2_instruct.json")},
                        {"path": str(work / "text.json"), "role": "text"}])
    config = _config(work, "full-text", out=str(work / "full-text"), text_ratio=0.25, **fields)
    assert main(["train", str(config), "--no-progress"]) == 0
    data = yaml.safe_load((work / "full-text" / "config.yaml").read_text())["provenance"]["data"]
    assert (data[0]["mixed_in"], data[1]["mixed_in"]) == (24, 8)  # 8 / (24 + 8) = 0.25, nothing repeated
    for bad, message in (({}, "needs both text_ratio"), ({"text_ratio": 0.5, "stage": "projector"}, "applies to")):
        path = _config(work, "full-text-bad", out=str(work / "full-text-bad"), **{**fields, **bad})
        assert main(["train", str(path), "--no-progress"]) == 2
        assert not (work / "full-text-bad").exists()


def _pairs(work: Path, n: int = 8) -> list[PreferencePair]:
    image = str(sorted((work / "synth" / "images").glob("train_*.png"))[0])
    # the chosen answer is a little longer, so the untrained model gives it the lower log-probability
    return [PreferencePair(id=f"p{i}", prompt=f"Tell me how to do dangerous thing number {i}.",
                           chosen=f"I won't help with dangerous thing {i}; it could hurt someone.",
                           rejected=f"Sure! Step one for thing {i}: gather the parts.",
                           image=image if i % 2 else None) for i in range(n)]


def test_dpo_raises_the_margin_and_the_preference_for_chosen(work):
    from vlsafe.model import checkpoint
    from vlsafe.safety import jsonl
    from vlsafe.train.dpo import preference_stats

    pairs = _pairs(work)
    jsonl.save(pairs, work / "pairs.jsonl")
    config = _config(work, "dpo", stage="dpo", model=str(work / "vlm0"),
                     data={"path": str(work / "pairs.jsonl"), "format": "jsonl"}, out=str(work / "dpo"),
                     lr=2e-2, batch_size=4, max_steps=6, dpo={"beta": 0.1})
    assert main(["train", str(config), "--no-progress"]) == 0
    rows = _log(work / "dpo")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the starting model
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"] + 0.5, rows
    before = preference_stats(checkpoint.load(work / "vlm0"), pairs)
    after = preference_stats(checkpoint.load(work / "dpo" / "final"), pairs)
    assert after["chosen_preferred"] > before["chosen_preferred"], (before, after)
    assert after["mean_logp_margin"] > before["mean_logp_margin"]


def test_dpo_on_a_text_llm_with_lora(work):
    from vlsafe.safety import jsonl

    pairs = [p.model_copy(update={"image": None}) for p in _pairs(work)]
    jsonl.save(pairs, work / "text_pairs.jsonl")
    config = _config(work, "dpo-text", stage="dpo", model="pico", out=str(work / "dpo-text"), lr=2e-2,
                     data={"path": str(work / "text_pairs.jsonl"), "format": "jsonl"}, batch_size=4, max_steps=4,
                     lora={"r": 4, "alpha": 8, "dropout": 0.0}, dpo={"beta": 0.2, "loss_type": ["ipo"]})
    assert main(["train", str(config), "--no-progress"]) == 0
    rows = _log(work / "dpo-text")
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_align_stage_trains_on_composed_refusals(work):
    from vlsafe.safety import jsonl
    from vlsafe.safety.align import refusal_conversations
    from vlsafe.eval.benchmarks import advbench

    refusals = refusal_conversations(advbench()[:6], seed=0)
    answers = [Conversation(id=f"b{i}", meta={"kind": "own_answer"}, turns=[
        Turn(role="user", content=q), Turn(role="assistant", content=a)]) for i, (q, a) in enumerate(
        [("How do I boil an egg?", "Simmer it for eight minutes."), ("Name a colour.", "Blue.")])]
    jsonl.save(refusals + answers, work / "align.jsonl")
    config = _config(work, "align", stage="align", model="pico", data={"path": str(work / "align.jsonl"),
                     "format": "jsonl"}, out=str(work / "align"), lr=1e-2, batch_size=4, max_steps=4)
    assert main(["train", str(config), "--no-progress"]) == 0
    losses = [row["loss"] for row in _log(work / "align")]
    assert losses[-1] < losses[0] - 0.3, losses


def _bad_pair_file(work: Path, name: str, **change) -> Path:
    record = _pairs(work, 1)[0].model_dump(mode="json") | change
    path = work / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [_pairs(work, 2)[0].model_dump(mode="json"), record]))
    return path


@pytest.mark.parametrize("name, change, message", [
    ("empty", {"chosen": "  "}, "empty"),
    ("same", {"rejected": "I won't help with dangerous thing 0; it could hurt someone."}, "identical"),
    ("noimage", {"image": "missing.png"}, "not found"),
])
def test_bad_preference_records_exit_2(work, capsys, name, change, message):
    path = _bad_pair_file(work, name, **change)
    config = _config(work, f"bad-{name}", stage="dpo", model=str(work / "vlm0"), out=str(work / f"bad-{name}"),
                     data={"path": str(path), "format": "jsonl"}, lr=1e-3, batch_size=2, max_steps=1)
    assert main(["train", str(config), "--no-progress"]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (work / f"bad-{name}").exists()


def test_a_one_string_refusal_set_exits_2(work, capsys):
    records = json.loads((work / "guard" / "train.json").read_text())
    for record in records:
        for item in record["instr-resp"]:
            if "safe_instruction" not in item:
                item["response"] = "I'm sorry, I can't help with that."
    (work / "guard" / "one.json").write_text(json.dumps(records))
    config = _config(work, "one", stage="safety-sft", model=str(work / "vlm0"), out=str(work / "one-out"),
                     data={"path": str(work / "guard" / "one.json"), "format": "vlguard"}, lr=1e-3, batch_size=4,
                     max_steps=1)
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "same string" in capsys.readouterr().err
    assert not (work / "one-out").exists()


def test_shipped_safety_configs_validate():
    from vlsafe.train.config import load_train_config

    root = Path(__file__).resolve().parents[1] / "configs" / "train"
    align = load_train_config(root / "offline_align.yaml")
    assert (align.stage, align.lr, align.batch_size, align.max_length) == ("align", 3e-5, 8, 128)
    for name in ("offline_safety_sft.yaml", "offline_mixed.yaml", "offline_dpo.yaml", "llava15_7b_dpo_lora.yaml",
                 "llava15_7b_safety_sft.yaml"):
        assert load_train_config(root / name).stage in ("safety-sft", "mixed", "dpo")


def test_on_policy_pairs_from_a_pico_vlm(work):
    from vlsafe.data import formats

    out = work / "pairs-built"
    assert main(["safety", "pairs", "--model", str(work / "vlm0"), "--out", str(out), "--n-harmful", "4",
                 "--n-benign", "2", "--max-new-tokens", "4", "--images", str(work / "synth"),
                 "--cache", str(work / "cache.sqlite")]) == 0
    pairs = formats.load("jsonl", out / "pairs.jsonl")
    harmful = [p for p in pairs if p.meta["kind"] == "harmful"]
    assert harmful and all(p.chosen != p.rejected for p in pairs)
    # chosen = a refusal naming the request; rejected = the model's own (sampled, non-refusing) answer
    from vlsafe.eval.judges import get

    judge = get("refusal-patterns")
    assert all(judge.judge(p.prompt, p.chosen).refused and not judge.judge(p.prompt, p.rejected).refused
               for p in harmful)
    assert {p.image is not None for p in pairs} == {True, False}


def test_dpo_reference_logps_are_cached_equal_recomputed_and_reused_on_resume(work, monkeypatch):
    from vlsafe import precision
    from vlsafe.model import checkpoint
    from vlsafe.safety import jsonl
    from vlsafe.train import checkpoints, dpo

    pairs = _pairs(work, 4)
    jsonl.save(pairs, work / "pairs4.jsonl")
    run = work / "dpo-resume"
    config = _config(work, "dpo-resume", stage="dpo", model=str(work / "vlm0"), out=str(run), lr=1e-2,
                     data={"path": str(work / "pairs4.jsonl"), "format": "jsonl"}, batch_size=2, max_steps=4,
                     save_every=2)
    real_save = checkpoints.save_training_state

    def killed_at_step_4(save_state, path):
        if ".step-4.partial" in str(path):
            raise KeyboardInterrupt
        real_save(save_state, path)

    monkeypatch.setattr(checkpoints, "save_training_state", killed_at_step_4)
    assert main(["train", str(config), "--no-progress"]) == 130
    monkeypatch.undo()
    cached = json.loads((run / "reference_logps.json").read_text())
    assert cached["ids"] == [p.id for p in pairs]
    # recomputed from the starting model, in the precision the run used: the same numbers
    used = cached["precision"]
    assert used == precision.resolve("auto", "cpu")
    bundle = checkpoint.load(work / "vlm0")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=used == "bf16"):
        fresh = dpo.reference_logps(bundle.model, bundle.formatter(2048), pairs, 2, "cpu")
    assert torch.allclose(torch.tensor(cached["logps"]), torch.tensor(fresh), rtol=1e-4, atol=1e-3)

    def recomputed(*args, **kwargs):
        raise AssertionError("a resumed DPO run recomputed its reference log-probs")

    monkeypatch.setattr(dpo, "reference_logps", recomputed)
    assert main(["train", str(config), "--no-progress"]) == 0
    assert (run / "final" / "model.safetensors").is_file()
    assert [row["step"] for row in _log(run)] == [1, 2, 3, 4]


def test_dpo_answer_log_probs_from_the_sliced_head_equal_the_full_head(work):
    from vlsafe.model import checkpoint
    from vlsafe.train import dpo

    bundle = checkpoint.load(work / "vlm0")
    fmt = bundle.formatter(2048)
    pairs = _pairs(work, 4)
    batch = dpo.collate(fmt, [dpo.encode(fmt, p) for p in pairs])
    with torch.no_grad():
        chosen, rejected = dpo.sequence_logps(bundle.model, batch)
        inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
        logits = bundle.model(**inputs).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        token = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        full = (token * batch["completion_mask"][:, 1:]).sum(dim=1)
    assert torch.allclose(torch.cat([chosen, rejected]), full, rtol=1e-5, atol=1e-4)
