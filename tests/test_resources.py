"""Resources: a run that cannot fit memory is refused before loading, with the estimate; a full disk or an
unwritable output folder is one line, nothing half-written, earlier outputs intact."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from vlsafe import io, resources
from vlsafe.cli import main
from vlsafe.errors import VlsafeError

REPO = Path(__file__).resolve().parents[1]

# Llama-2-7B + CLIP ViT-L/14-336 as a vlsafe VLM's config.json: the shape of configs/train/llava15_7b_stage2.yaml
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32001, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "projection_dim": 768}


def _vlm_config_dir(path: Path, text: dict, vision: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "vlsafe_vlm", "architectures": ["VisionLanguageModel"], "text_config": text,
        "vision_config": vision, "tower_kind": "hf", "vision_hidden_size": vision["hidden_size"],
        "num_image_tokens": 576, "projector_type": "mlp2x_gelu", "image_token_id": 32000,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}))
    return path


@pytest.fixture(scope="module")
def llava_7b(tmp_path_factory) -> Path:
    return _vlm_config_dir(tmp_path_factory.mktemp("shape") / "llava-7b", LLAMA2_7B, CLIP_L_336)


def test_a_7b_full_fine_tune_is_refused_on_24_gb_with_the_estimate(llava_7b, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(resources, "available_memory", lambda: (24 * resources.GB, "CPU RAM"))
    out = tmp_path / "run"
    status = main(["train", str(REPO / "configs/train/llava15_7b_stage2.yaml"), f"model={llava_7b}", f"out={out}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert str(llava_7b) in err and "24.0 GiB available" in err
    estimate = float(err.split("needs about ")[1].split(" GiB")[0])
    assert estimate > 100  # fp32 master weights + grads + AdamW of ~7B trainable parameters: >= 16 bytes each
    assert not out.exists()


def test_the_estimate_counts_parameters_exactly_and_follows_the_config(llava_7b, tmp_path):
    from vlsafe.train.config import load_train_config

    config = load_train_config(REPO / "configs/train/llava15_7b_stage2.yaml", [f"model={llava_7b}", f"out={tmp_path}/o"])
    full = resources.estimate_training(config, processes=1, sharded=False)
    # Llama-2-7B (6.74B) + CLIP ViT-L/14-336 vision model (0.30B) + the 2-layer projector (21M)
    assert 7.0e9 < full.parameters < 7.1e9
    assert full.trainable == full.parameters - 303_507_456  # everything but the frozen tower
    assert full.optimizer == 8 * full.trainable and full.gradients == 4 * full.trainable
    projector = resources.estimate_training(config.model_copy(update={"stage": "projector"}), processes=1, sharded=False)
    assert projector.trainable == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    lora = resources.estimate_training(
        load_train_config(REPO / "configs/train/llava15_7b_stage2.yaml",
                          [f"model={llava_7b}", f"out={tmp_path}/o", "lora={r: 128, alpha: 256}"]), processes=1, sharded=False)
    assert lora.trainable < full.trainable / 10 and lora.optimizer < full.optimizer / 10
    assert lora.activations == full.activations
    zero3 = resources.estimate_training(config, processes=8, sharded=True)
    assert zero3.optimizer == full.optimizer // 8 and zero3.activations < full.activations
    checkpointed = resources.estimate_training(config.model_copy(update={"gradient_checkpointing": False}),
                                               processes=1, sharded=False)
    assert checkpointed.activations > full.activations


def test_a_small_run_fits_and_a_model_without_config_is_not_guessed(tmp_path):
    from vlsafe.train.config import TrainConfig

    pico_shape = dict(LLAMA2_7B, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000)
    vision = dict(CLIP_L_336, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    small = _vlm_config_dir(tmp_path / "small", pico_shape, vision)
    config = TrainConfig(stage="full", model=str(small), data=[{"path": "x.json"}], out=str(tmp_path / "o"),
                         lr=1e-4, batch_size=4, max_length=128)
    assert resources.check_training_fits(config, available=24 * resources.GB).total < resources.GB
    assert resources.check_training_fits(config.model_copy(update={"model": "pico"})) is None
    with pytest.raises(VlsafeError, match="training needs about"):
        resources.check_training_fits(config, available=1024)


def test_a_full_disk_while_saving_leaves_nothing_and_keeps_the_earlier_output(tmp_path, monkeypatch, capsys):
    from vlsafe.model import checkpoint

    out = tmp_path / "vlm"
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bundle = checkpoint.load(out)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(bundle.model), "save_pretrained", disk_full)
    with pytest.raises(VlsafeError, match="No space left on device"):
        checkpoint.save(bundle, out, overwrite=True)  # a training checkpoint rewritten in place
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    capsys.readouterr()
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(tmp_path / "second")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vlm"]  # no second/, no .partial


def test_an_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(blocker / "vlm")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write output" in err
    assert blocker.read_text() == "in the way"


def test_write_json_failing_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    io.write_json(target, {"n": 1})

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(VlsafeError, match="results.json: cannot write"):
        io.write_json(target, {"n": 2})
    assert json.loads(target.read_text()) == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
