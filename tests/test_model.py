"""The VLM: build, save/load, HF export, chat formatting, template lint, text-only and image prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlsafe.cli import main
from vlsafe.data.records import Conversation, Prompt, Turn
from vlsafe.model import checkpoint
from vlsafe.model.chat import IGNORE_INDEX
from vlsafe.errors import VlsafeError


@pytest.fixture(scope="module")
def pico_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pico") / "vlm"
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(out), "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, colour in [("red", (230, 20, 20)), ("blue", (20, 20, 230))]:
        out[name] = str(root / f"{name}.png")
        Image.new("RGB", (48, 48), colour).save(out[name])
    return out


def test_save_load_round_trip_is_bit_identical(pico_dir, tmp_path):
    first = checkpoint.load(pico_dir)
    again = tmp_path / "again"
    checkpoint.save(first, again)
    second = checkpoint.load(again)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.content_hash(pico_dir) == checkpoint.content_hash(again)
    # the LLM's own chat template (with SmolLM2's default system prompt) survives into the VLM
    rendered = second.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in rendered
    assert json.loads((again / "vlsafe.json").read_text())["content_sha256"] == checkpoint.content_hash(again)


def test_text_and_image_prompts_run_and_the_image_matters(pico_dir, images):
    bundle = checkpoint.load(pico_dir)
    fmt = bundle.formatter()
    text_only = fmt.encode_prompt("Hello there")
    assert bundle.model.config.image_token_id not in text_only.input_ids
    red, blue = fmt.encode_prompt("Colour?", images["red"]), fmt.encode_prompt("Colour?", images["blue"])
    assert red.input_ids.count(bundle.model.config.image_token_id) == bundle.model.config.num_image_tokens == 16
    with torch.no_grad():
        logits = [bundle.model(**{k: v for k, v in fmt.collate([e]).items() if k != "labels"}).logits[0, -1]
                  for e in (red, blue, text_only)]
    assert not torch.allclose(logits[0], logits[1])  # the picture reaches the language model
    from vlsafe.eval.generate import Decoding, generate

    prompts = [Prompt(id="t", text="Hello there"), Prompt(id="i", text="Colour?", image=images["red"])]
    replies = generate(bundle, prompts, Decoding(max_new_tokens=4))
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_batched_left_padded_generation_matches_one_at_a_time(pico_dir, images):
    from vlsafe.eval.generate import Decoding, generate

    bundle = checkpoint.load(pico_dir)
    prompts = [Prompt(id="a", text="A short one"),
               Prompt(id="b", text="A much longer request that needs more tokens than the first", image=images["blue"])]
    together = generate(bundle, prompts, Decoding(max_new_tokens=6), batch_size=2)
    alone = [generate(bundle, [p], Decoding(max_new_tokens=6))[0] for p in prompts]
    assert together == alone


def test_assistant_only_labels(pico_dir, images):
    bundle = checkpoint.load(pico_dir)
    fmt = bundle.formatter()
    conv = Conversation(id="c", image=images["red"], turns=[
        Turn(role="user", content="What colour?"), Turn(role="assistant", content="Red."),
        Turn(role="user", content="Sure?"), Turn(role="assistant", content="Yes, red.")])
    enc = fmt.encode_conversation(conv)
    targets = bundle.tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert targets == "Red.<|im_end|>\nYes, red.<|im_end|>\n"
    image_positions = [i for i, t in enumerate(enc.input_ids) if t == bundle.model.config.image_token_id]
    assert all(enc.labels[i] == IGNORE_INDEX for i in image_positions)
    batch = fmt.collate([enc])
    loss = bundle.model(**batch).loss
    assert torch.isfinite(loss) and loss > 0


def test_plain_template_is_the_image_then_the_caption(pico_dir, images):
    """LLaVA's pre-training format: image tokens, newline, caption + EOS as the only targets; no system prompt."""
    bundle = checkpoint.load(pico_dir)
    fmt = bundle.formatter()
    conv = Conversation(id="c", image=images["red"], turns=[
        Turn(role="user", content="Describe the image briefly."), Turn(role="assistant", content="A red square.")])
    plain, chat = fmt.encode_plain(conv), fmt.encode_conversation(conv)
    image_id, n_image = bundle.model.config.image_token_id, bundle.model.config.num_image_tokens
    assert plain.input_ids[:n_image] == [image_id] * n_image and image_id not in plain.input_ids[n_image:]
    targets = bundle.tokenizer.decode([t for t in plain.labels if t != IGNORE_INDEX])
    assert targets == "A red square." + bundle.tokenizer.eos_token
    assert "Describe" not in plain.text and "system" not in plain.text and len(plain.input_ids) < len(chat.input_ids)
    assert torch.isfinite(bundle.model(**fmt.collate([plain])).loss)
    for bad, why in ((conv.model_copy(update={"image": None}), "no image"),
                     (conv.model_copy(update={"turns": conv.turns * 2}), r"user \+ assistant \+ user \+ assistant")):
        with pytest.raises(VlsafeError, match=why):
            fmt.encode_plain(bad)
    # a max_length that keeps the image keeps it whole; one that cannot is an error, as in the chat format
    assert len(bundle.formatter(max_length=n_image + 2).encode_plain(conv).input_ids) == n_image + 2
    with pytest.raises(VlsafeError, match="cuts through the image tokens"):
        bundle.formatter(max_length=n_image).encode_plain(conv)


def test_export_hf_gives_the_same_logits(pico_dir, images, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "llava"
    assert main(["export-hf", str(pico_dir), str(out)]) == 0
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()  # transformers alone
    bundle = checkpoint.load(pico_dir)
    fmt = bundle.formatter()
    batch = fmt.collate([fmt.encode_prompt("What colour is this?", images["red"]), fmt.encode_prompt("Hi")],
                        padding_side="left")
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(bundle.model(**batch).logits, llava(**batch).logits)
    # the exported processor prepares the same inputs from a plain prompt
    processor = AutoProcessor.from_pretrained(out)
    text = processor.apply_chat_template([{"role": "user", "content": "<image>\nWhat colour is this?"}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = processor(images=Image.open(images["red"]), text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()


def test_lint_passes_on_a_good_template_and_catches_broken_ones(pico_dir, tmp_path, capsys):
    assert main(["lint-template", "--model", str(pico_dir)]) == 0
    assert "0 problems" in capsys.readouterr().out
    template = (pico_dir / "chat_template.jinja").read_text()
    # 1: the assistant header inside a conversation differs from the generation prompt
    # 2: the template trims answers, so labels cannot decode to the assistant's words
    broken = {
        "header": template.replace("'<|im_start|>' + message['role'] + '\n'",
                                   "'<|im_start|>' + message['role'] + (': ' if message['role'] == 'assistant' else '\n')"),
        "trim": template.replace("message['content']", "message['content'][:3]"),
    }
    for name, text in broken.items():
        assert text != template, f"broken variant {name} did not change the template"
        bad = tmp_path / name
        shutil.copytree(pico_dir, bad)
        (bad / "chat_template.jinja").write_text(text)
        assert main(["lint-template", "--model", str(bad)]) == 1, name
        assert "lint:" in capsys.readouterr().err


def test_efficientnet_tower_matches_the_reference_implementation():
    from efficientnet_lite_pytorch import EfficientNet  # test-only reference

    from vlsafe import assets
    from vlsafe.model.efficientnet import EfficientNetLite0, load_imagenet_state

    weights = assets.asset_files("efficientnet-lite0")[0]
    ours = EfficientNetLite0().eval()
    load_imagenet_state(ours, weights)
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours.feature_map(x), ref.extract_features(x), atol=1e-5)
        assert ours(x).shape == (1, 49, 1280)


def test_efficientnet_feature_layer_picks_a_map_like_hf_hidden_states(tmp_path, images, capsys):
    from vlsafe.model.efficientnet import feature_shapes

    shapes = feature_shapes(224)
    assert len(shapes) == 18 and shapes[-1] == (1280, 7) and shapes[-2] == (320, 7) and shapes[-7] == (112, 14)
    out = tmp_path / "vlm"
    assert main(["build", "--llm", "pico", "--tower", "efficientnet-lite0", "--feature-layer", "-2",
                 "--out", str(out)]) == 0
    bundle = checkpoint.load(out)
    config = bundle.model.config
    assert (config.vision_feature_layer, config.vision_hidden_size, config.num_image_tokens) == (-2, 320, 49)
    pixels = bundle.image_processor(images=[Image.open(images["red"])], return_tensors="pt")["pixel_values"]
    tower = bundle.model.vision_tower
    with torch.no_grad():
        # the last block's output: the head's input, before its 1x1 convolution
        head_input = {}
        tower._conv_head.register_forward_hook(lambda m, args, result: head_input.update(x=args[0]))
        tower(pixels)
        assert torch.equal(tower(pixels, -2), head_input["x"].flatten(2).transpose(1, 2))
        assert bundle.model.get_image_features(pixels).shape == (1, 49, config.text_config.hidden_size)
        assert tower(pixels, -7).shape == (1, 196, 112)
    # the default stays the head, and a layer that does not exist is one line, exit 2, nothing written
    assert checkpoint.build_vlm("pico", "efficientnet-lite0").model.config.vision_hidden_size == 1280
    assert main(["build", "--llm", "pico", "--tower", "efficientnet-lite0", "--feature-layer", "18",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "feature layer 18 does not exist" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_offline_default_vlm_answers_text_and_image_prompts(images):
    from vlsafe.eval.generate import Decoding, generate

    bundle = checkpoint.build_vlm("smollm2-135m-instruct", "efficientnet-lite0")
    assert bundle.model.config.num_image_tokens == 49
    prompts = [Prompt(id="t", text="What is the capital of France?"),
               Prompt(id="i", text="Describe the image.", image=images["red"])]
    replies = generate(bundle, prompts, Decoding(max_new_tokens=12))
    assert "Paris" in replies[0]
    assert replies[1].strip()


@pytest.mark.parametrize("argv, message", [
    (["build", "--llm", "pico", "--tower", "no-such-tower", "--out", "{tmp}/x"], "unknown vision tower"),
    (["build", "--llm", "no-such-llm", "--tower", "pico", "--out", "{tmp}/x"], "unknown language model"),
    (["build", "--llm", "pico", "--tower", "pico", "--projector", "conv", "--out", "{tmp}/x"], "unknown projector"),
    (["build", "--llm", "{tmp}/pickled", "--tower", "pico", "--out", "{tmp}/x"], "no .safetensors"),
    (["export-hf", "{tmp}/missing", "{tmp}/y"], "missing"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_existing_output_and_a_tower_that_does_not_fit(pico_dir, images, tmp_path, capsys):
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(pico_dir)]) == 2
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "misfit"
    shutil.copytree(pico_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_image_tokens"] = 10
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["chat", "--model", str(bad), "--prompt", "Colour?", "--image", images["red"],
                 "--max-new-tokens", "2"]) == 2
    assert "projector expects" in capsys.readouterr().err


def test_auto_classes_load_a_vlm_directory(pico_dir):
    from transformers import AutoModelForCausalLM

    import vlsafe.model  # noqa: F401  (registers the VLM)

    model = AutoModelForCausalLM.from_pretrained(pico_dir)
    assert type(model).__name__ == "VisionLanguageModel"


def test_config_overrides_and_bad_yaml(tmp_path):
    from vlsafe.config import BuildConfig, load_config
    from vlsafe.errors import VlsafeError

    path = tmp_path / "build.yaml"
    path.write_text("llm: pico\ntower: pico\nseed: 1\n")
    config = load_config(BuildConfig, path, ["seed=7", "projector=linear"])
    assert (config.seed, config.projector, config.llm) == (7, "linear", "pico")
    path.write_text("llm: pico\ntower: pico\nsede: 1\n")
    with pytest.raises(VlsafeError, match="sede"):
        load_config(BuildConfig, path)
    path.write_text("llm: [pico\n")
    with pytest.raises(VlsafeError, match="not valid YAML"):
        load_config(BuildConfig, path)
    with pytest.raises(VlsafeError, match="key=value"):
        load_config(BuildConfig, None, ["seed"], llm="pico", tower="pico")


def test_truncation_never_cuts_through_an_image(pico_dir, images):
    from vlsafe.errors import VlsafeError

    bundle = checkpoint.load(pico_dir)
    conv = Conversation(id="long", image=images["red"], turns=[
        Turn(role="user", content="What colour?"), Turn(role="assistant", content="Red. " * 40)])
    assert len(bundle.formatter(max_length=60).encode_conversation(conv).input_ids) == 60
    with pytest.raises(VlsafeError, match="cuts through the image"):
        bundle.formatter(max_length=25).encode_conversation(conv)


def test_llm_params_counts_without_loading_and_the_presets_record_is_right(tmp_path):
    """The dry run's LLM size: a folder's config.json built on the meta device, a preset's recorded count; both
    equal what the loaded model passes each token through (the count MFU uses)."""
    from vlsafe.bench.limits import model_params
    from vlsafe.model import checkpoint
    from vlsafe.model.llms import llm_params, pico_llm

    model, _ = pico_llm()
    model.save_pretrained(tmp_path / "llm")
    assert llm_params(str(tmp_path / "llm")) == model_params(model)
    assert llm_params("smollm2-135m-instruct") == model_params(checkpoint.load("smollm2-135m-instruct").model)
    assert llm_params(str(tmp_path / "missing")) is None and llm_params("pico") is None
