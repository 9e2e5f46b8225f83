"""Merging on pico checkpoints built in tmp dirs: every method against its formula, VLM scopes, layouts, layer
rules, gradients, the manifest, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from vlsafe.cli import main
from vlsafe.merge import methods
from vlsafe.merge.config import parse, evaluate

HIDDEN, LAYERS, VOCAB = 16, 3, 64


@pytest.fixture(scope="session")
def llama_spec():
    """Names and shapes of a pico Llama from transformers itself (on the meta device), and its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def spec(hidden=HIDDEN, layers=LAYERS, vocab=VOCAB):
        config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                             max_position_embeddings=64, tie_word_embeddings=False)
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
        return config, shapes
    return spec


def _random(shapes: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) for k, s in sorted(shapes.items())}


@pytest.fixture
def make_llama(tmp_path, llama_spec):
    def make(name, seed, **dims):
        config, shapes = llama_spec(**dims)
        path = tmp_path / name
        config.save_pretrained(path)
        (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
        (path / "chat_template.jinja").write_text("{{ messages }}")
        save_file(_random(shapes, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    return make


LAYOUTS = {  # the language-model prefixes and the projector / tower prefixes of layouts (b) and (c)
    "vlsafe_vlm": ({"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
                   "projector.", "vision_tower."),
    "llava_hf": ({"model.": "model.language_model.", "lm_head.": "lm_head."},
                 "model.multi_modal_projector.", "model.vision_tower."),
}


@pytest.fixture
def make_vlm(tmp_path, llama_spec):
    def make(name, seed, layout="vlsafe_vlm", vocab=VOCAB):
        config, shapes = llama_spec(vocab=vocab)
        lm, projector, tower = LAYOUTS[layout]
        tensors = {}
        for key, tensor in _random(shapes, seed).items():
            prefix = next(p for p in lm if key.startswith(p))
            tensors[lm[prefix] + key[len(prefix):]] = tensor
        generator = torch.Generator().manual_seed(1000 + seed)
        for key, shape in {f"{projector}linear_1.weight": (HIDDEN, 8), f"{projector}linear_1.bias": (HIDDEN,),
                           f"{projector}linear_2.weight": (HIDDEN, HIDDEN), f"{projector}linear_2.bias": (HIDDEN,),
                           f"{tower}embeddings.patch.weight": (8, 3, 2, 2),
                           f"{tower}encoder.layers.0.mlp.fc1.weight": (8, 8)}.items():
            tensors[key] = torch.randn(shape, generator=generator)
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "vlsafe_vlm", "dtype": "float32"}))
        (path / "preprocessor_config.json").write_text("{}")
        (path / "vlsafe.json").write_text('{"source": "not the merge"}')
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    return make


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def merge(tmp_path, config: dict, out="out", *extra) -> tuple[int, Path]:
    cfg = tmp_path / f"{out}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return main(["merge", str(cfg), "--out", str(tmp_path / out), *extra]), tmp_path / out


def layer(key: str):
    """The decoder layer of a plain Llama key (None for embeddings, final norm, head)."""
    parts = key.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


# ------------------------------------------------------------------------------------------------ the formulas


def test_linear_with_gradient_and_filter_is_the_weighted_mean(tmp_path, make_llama):
    a, b, c = (make_llama(n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    rc, out = merge(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}},
        {"model": str(b), "parameters": {"weight": [0.0, 2.0]}},  # 0 at layer 0 (and embeddings), 2 at the last
        {"model": str(c), "parameters": {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 0.5}]}}]})
    assert rc == 0
    xa, xb, xc, got = load_dir(a), load_dir(b), load_dir(c), load_dir(out)
    assert got.keys() == xa.keys()
    for key in xa:
        t = layer(key) / (LAYERS - 1) if layer(key) is not None else 0.0
        w = [1.0, 2.0 * t, 3.0 if "mlp" in key else 0.5]
        want = (w[0] * xa[key].double() + w[1] * xb[key].double() + w[2] * xc[key].double()) / sum(w)
        torch.testing.assert_close(got[key].double(), want, atol=1e-6, rtol=0)


def test_task_arithmetic_is_base_plus_scaled_task_vectors(tmp_path, make_llama):
    a, b, c = (make_llama(n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    rc, out = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(a), "parameters": {"lambda": 0.7},
                               "models": [{"model": str(b), "parameters": {"weight": 0.6}},
                                          {"model": str(c), "parameters": {"weight": -0.4}}]})
    assert rc == 0
    xa, xb, xc, got = load_dir(a), load_dir(b), load_dir(c), load_dir(out)
    for key in xa:
        base = xa[key].double()
        want = base + 0.7 * (0.6 * (xb[key].double() - base) - 0.4 * (xc[key].double() - base))
        torch.testing.assert_close(got[key].double(), want, atol=1e-6, rtol=0)


def _ties_reference(base, others, weights, densities):
    """TIES written from the paper: trim each task vector to its top-k magnitudes, elect the sign of the weighted
    sum, average the agreeing weighted entries by their weights."""
    trimmed = []
    for x, w, d in zip(others, weights, densities):
        delta = (x - base).flatten()
        k = max(1, int(d * delta.numel()))
        threshold = delta.abs().sort(descending=True).values[k - 1]
        trimmed.append(w * torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stack = torch.stack(trimmed)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).double()
    num = torch.zeros_like(base.flatten())
    den = torch.zeros_like(base.flatten())
    for t, w in zip(stack, weights):
        agree = (torch.sign(t) == sign)
        num += torch.where(agree, t, 0.0)
        den += torch.where(agree, w, 0.0)
    den[den == 0] = 1
    return base + (num / den).reshape(base.shape)


def test_ties_matches_an_independent_implementation(tmp_path, make_llama):
    a, b, c = (make_llama(n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    rc, out = merge(tmp_path, {"merge_method": "ties", "base_model": str(a), "models": [
        {"model": str(b), "parameters": {"weight": 0.7, "density": 0.5}},
        {"model": str(c), "parameters": {"weight": 0.3, "density": 0.8}}]})
    assert rc == 0
    xa, xb, xc, got = load_dir(a), load_dir(b), load_dir(c), load_dir(out)
    for key in xa:
        want = _ties_reference(xa[key].double(), [xb[key].double(), xc[key].double()], [0.7, 0.3], [0.5, 0.8])
        torch.testing.assert_close(got[key].double(), want, atol=1e-6, rtol=0)


def test_slerp_follows_the_great_circle(tmp_path, make_llama):
    a, b = make_llama("a", 1), make_llama("b", 2)
    rc, out = merge(tmp_path, {"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)},
                    {"model": str(b)}], "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]},
                                                             {"value": 0.3}]}})
    assert rc == 0
    xa, xb, got = load_dir(a), load_dir(b), load_dir(out)
    for key in xa:
        t = (layer(key) / (LAYERS - 1)) if "self_attn" in key else 0.3
        u, v = xa[key].double().flatten(), xb[key].double().flatten()
        theta = math.acos(float((u / u.norm()) @ (v / v.norm())))
        want = (math.sin((1 - t) * theta) * u + math.sin(t * theta) * v) / math.sin(theta)
        torch.testing.assert_close(got[key].double().flatten(), want, atol=1e-6, rtol=0)


def test_dare_keeps_about_density_and_rescales_to_the_same_l1():
    base, other = torch.zeros(20000), torch.randn(20000, generator=torch.Generator().manual_seed(0))
    merged = methods.dare_linear(base, [other], [1.0], [0.3], torch.Generator().manual_seed(5))
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    scale = (merged[kept] / other[kept]).unique()
    assert torch.allclose(scale, torch.tensor([float(other.abs().sum() / other[kept].abs().sum())]), atol=1e-5)
    again = methods.dare_linear(base, [other], [1.0], [0.3], torch.Generator().manual_seed(5))
    assert torch.equal(merged, again)


def test_breadcrumbs_drops_outliers_and_small_entries():
    delta = torch.arange(1.0, 101.0)  # magnitudes 1..100
    kept = methods.magnitude_outlier_prune(delta, density=0.5, gamma=0.1)
    assert torch.equal(kept.nonzero().flatten(), torch.arange(40, 90))  # values 41..90: top 10 and bottom 40 gone


def test_dare_merge_is_reproducible_under_a_seed(tmp_path, make_llama):
    a, b, c = (make_llama(n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    config = {"merge_method": "dare_ties", "base_model": str(a), "seed": 7, "models": [
        {"model": str(b), "parameters": {"weight": 0.5, "density": 0.4}},
        {"model": str(c), "parameters": {"weight": 0.5, "density": 0.6}}]}
    assert merge(tmp_path, config, "one")[0] == 0
    assert merge(tmp_path, config, "two")[0] == 0
    assert merge(tmp_path, {**config, "seed": 8}, "three")[0] == 0
    one, two, three = load_dir(tmp_path / "one"), load_dir(tmp_path / "two"), load_dir(tmp_path / "three")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], three[k]) for k in one)


def test_gradients_interpolate_over_depth_as_mergekit_does():
    config = parse({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}]}, "test")
    assert config.models[0].parameters["weight"] == 1
    gradient = [0.0, 0.3, 1.0, 0.2]
    # scaled = t * (n - 1); linear between the two nearest entries
    assert evaluate(gradient, ("k",), 0.0) == 0.0
    assert evaluate(gradient, ("k",), 0.5) == pytest.approx(0.65)
    assert evaluate(gradient, ("k",), 1.0) == pytest.approx(0.2)
    assert evaluate(gradient, ("k",), 1 / 3) == pytest.approx(0.3)
    assert evaluate([True, False], ("k",), 0.4) is True  # non-numeric lists select, never interpolate
    conditional = parse({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": [
        {"filter": "mlp", "value": [1.0, 3.0]}, {"value": 9.0}]}}]}, "test").models[0].parameters["weight"]
    assert evaluate(conditional, ("model.layers.1.mlp.up_proj.weight",), 0.5) == pytest.approx(2.0)
    assert evaluate(conditional, ("model.norm.weight",), 0.5) == 9.0


# ------------------------------------------------------------------------------------------------ VLMs and layouts


def _manifest(out: Path) -> dict:
    return json.loads((out / "merge_manifest.json").read_text())


def test_vlm_merge_changes_exactly_the_tensors_in_scope(tmp_path, make_vlm):
    a, b = make_vlm("a", 1), make_vlm("b", 2)
    for scope, out in ((None, "default"), (["language_model"], "lm_only"), (["tower"], "tower_only")):
        config = {"merge_method": "task_arithmetic", "base_model": str(a),
                  "models": [{"model": str(b), "parameters": {"weight": 0.5}}]}
        if scope:
            config["scope"] = scope
        assert merge(tmp_path, config, out)[0] == 0
        xa, xb, got = load_dir(a), load_dir(b), load_dir(tmp_path / out)
        assert got.keys() == xa.keys()
        in_scope = {"language_model": "language_model.", "projector": "projector.", "tower": "vision_tower."}
        prefixes = tuple(in_scope[s] for s in (scope or ["language_model", "projector"]))
        for key in xa:
            if key.startswith(prefixes):
                torch.testing.assert_close(got[key], xa[key] + 0.5 * (xb[key] - xa[key]), atol=1e-6, rtol=0)
            else:
                assert torch.equal(got[key], xa[key]), key  # bit-identical copy of the base
        manifest = _manifest(tmp_path / out)
        # every output tensor is accounted for, with what was done to it
        assert [t["name"] for t in manifest["tensors"]] == sorted(xa)
        for entry in manifest["tensors"]:
            assert entry["action"] == ("merged" if entry["name"].startswith(prefixes) else "copied")
        unused = manifest["summary"]["unused_input_tensors"].get(str(b), {})
        assert sum(unused.values()) == sum(1 for k in xb if not k.startswith(prefixes))


@pytest.mark.parametrize("layout", ["vlsafe_vlm", "llava_hf"])
def test_a_plain_llm_merges_into_the_language_model_of_a_vlm(tmp_path, make_vlm, make_llama, layout):
    vlm, llm = make_vlm("vlm", 1, layout), make_llama("llm", 2)
    rc, out = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(vlm),
                               "models": [{"model": str(llm), "parameters": {"weight": 0.25}}]})
    assert rc == 0
    xv, xl, got = load_dir(vlm), load_dir(llm), load_dir(out)
    lm_prefixes, projector, tower = LAYOUTS[layout]
    assert got.keys() == xv.keys()
    matched = 0
    for key in xl:
        prefix = next(p for p in lm_prefixes if key.startswith(p))
        vkey = lm_prefixes[prefix] + key[len(prefix):]
        torch.testing.assert_close(got[vkey], xv[vkey] + 0.25 * (xl[key] - xv[vkey]), atol=1e-6, rtol=0)
        matched += 1
    assert matched == len(xl)
    for key in xv:
        if key.startswith((projector, tower)):
            assert torch.equal(got[key], xv[key])
    manifest = _manifest(out)
    notes = {t["name"]: t.get("note", "") for t in manifest["tensors"] if t["action"] == "copied"}
    assert all(f"{llm} has no projector" in notes[k] for k in notes if k.startswith(projector))
    # the VLM's files come along, but not its provenance: the merge writes its own
    assert (out / "preprocessor_config.json").is_file()
    assert json.loads((out / "vlsafe.json").read_text())["source"] == "merge"


def test_layer_rules_take_layers_from_a_model_and_override_parameters(tmp_path, make_llama):
    a, b, c = (make_llama(n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    rc, out = merge(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(a),
                               "models": [{"model": str(b), "parameters": {"weight": 0.5}}],
                               "layers": [{"layer_range": [1, 2], "source": str(c)},
                                          {"layer_range": [2, 3], "parameters": {"weight": 1.0}}]})
    assert rc == 0
    xa, xb, xc, got = load_dir(a), load_dir(b), load_dir(c), load_dir(out)
    for key in xa:
        if layer(key) == 1:
            assert torch.equal(got[key], xc[key])
        else:
            w = 1.0 if layer(key) == 2 else 0.5
            torch.testing.assert_close(got[key], xa[key] + w * (xb[key] - xa[key]), atol=1e-6, rtol=0)
    unused = _manifest(out)["summary"]["unused_input_tensors"]
    assert unused[str(c)] == {"outside the layers taken from this model": len(xc) - 9}
    assert unused[str(b)] == {f"layer 1 taken from {c}": 9}


def test_sharded_inputs_and_outputs_load_in_transformers(tmp_path, make_llama):
    from transformers import LlamaForCausalLM

    a, b = make_llama("a", 1), make_llama("b", 2)
    tensors = load_dir(b)  # re-save b as two shards with an index
    (b / "model.safetensors").unlink()
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[:10], keys[10:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(b / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (b / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    rc, out = merge(tmp_path, {"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(b), "parameters": {"weight": 1}}]},
        "out", "--shard-size", "4KB")
    assert rc == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and sorted(index["weight_map"]) == keys
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    want = ((load_dir(a)["lm_head.weight"].bfloat16().float() + tensors["lm_head.weight"].bfloat16().float()) / 2)
    torch.testing.assert_close(model.lm_head.weight.float(), want.bfloat16().float())
    for name in ("tokenizer_config.json", "chat_template.jinja", "README.md", "merge_config.yaml"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert hashlib.sha256((b / shard).read_bytes()).hexdigest() in card


def test_sweep_writes_one_model_per_point(tmp_path, make_llama):
    a, b = make_llama("a", 1), make_llama("b", 2)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "a",
                                                        "models": [{"model": "b", "parameters": {"weight": 1.0}}]}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"config": "base.yaml", "grid": {
        "parameters.lambda": [0.5, 1.0], "merge_method": ["task_arithmetic", "ties"]}}, sort_keys=False))
    assert main(["merge", "sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "grid")]) == 0
    report = json.loads((tmp_path / "grid" / "sweep.json").read_text())
    assert report["evaluated"] is False and len(report["points"]) == 4
    assert report["points"][1]["assignment"] == {"parameters.lambda": 0.5, "merge_method": "ties"}
    assert not (tmp_path / "grid" / "pareto.json").exists()  # no eval section: merges only
    xa, xb = load_dir(a), load_dir(b)
    got = load_dir(tmp_path / "grid" / "point-000" / "model")
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[key], xa[key] + 0.5 * (xb[key] - xa[key]), atol=1e-6, rtol=0)


def test_vocab_common_merges_the_shared_rows_and_keeps_the_bases_extra_row(tmp_path, make_vlm, make_llama, capsys):
    vlm, llm = make_vlm("vlm", 1, vocab=VOCAB + 1), make_llama("llm", 2)  # the VLM added an <image> token
    config = {"merge_method": "task_arithmetic", "base_model": str(vlm),
              "models": [{"model": str(llm), "parameters": {"weight": 0.25}}]}
    rc, _ = merge(tmp_path, config, "default")
    err = capsys.readouterr().err
    assert rc == 2 and "vocabulary sizes differ" in err and "vocab: common" in err
    assert not (tmp_path / "default").exists()

    rc, out = merge(tmp_path, {**config, "vocab": "common"}, "common")
    assert rc == 0
    xv, xl, got = load_dir(vlm), load_dir(llm), load_dir(out)
    vocab_keys = {"language_model.model.embed_tokens.weight": "model.embed_tokens.weight",
                  "language_model.lm_head.weight": "lm_head.weight"}
    for vkey, lkey in vocab_keys.items():
        assert got[vkey].shape[0] == VOCAB + 1
        want = xv[vkey][:VOCAB] + 0.25 * (xl[lkey] - xv[vkey][:VOCAB])
        torch.testing.assert_close(got[vkey][:VOCAB], want, atol=1e-6, rtol=0)
        assert torch.equal(got[vkey][VOCAB:], xv[vkey][VOCAB:])  # bit-identical: the base's <image> row
    key = "language_model.model.layers.1.mlp.up_proj.weight"  # other tensors merge as before
    torch.testing.assert_close(got[key], xv[key] + 0.25 * (xl[key.removeprefix("language_model.")] - xv[key]),
                               atol=1e-6, rtol=0)
    manifest = _manifest(out)
    assert manifest["config"]["vocab"] == "common" and "vocab: common" in (out / "merge_config.yaml").read_text()
    recorded = {t["name"]: t["vocab"] for t in manifest["tensors"] if "vocab" in t}
    assert set(recorded) == set(vocab_keys)
    assert recorded["language_model.lm_head.weight"] == {
        "mode": "common", "merged_rows": [0, VOCAB], "copied_rows": [VOCAB, VOCAB + 1], "copied_from": str(vlm),
        "input_rows": {str(vlm): VOCAB + 1, str(llm): VOCAB}}

    # the extra rows must come from the base: a base with the smaller vocabulary is still an error
    rc, _ = merge(tmp_path, {**config, "vocab": "common", "base_model": str(llm),
                             "models": [{"model": str(vlm), "parameters": {"weight": 0.25}}]}, "reversed")
    assert rc == 2 and "make the model with the larger vocabulary the base" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad input


def _bad_cases(a, b, tmp_path, make_llama):
    ok = {"merge_method": "task_arithmetic", "base_model": str(a),
          "models": [{"model": str(b), "parameters": {"weight": 0.5}}]}
    wide, big_vocab, deep = make_llama("wide", 4, hidden=32), make_llama("vocab", 5, vocab=80), make_llama(
        "deep", 6, layers=4)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (pickled / "config.json").write_text("{}")
    other = lambda path: {**ok, "models": [{"model": str(path), "parameters": {"weight": 0.5}}]}  # noqa: E731
    return {
        "missing model": (other(tmp_path / "nowhere"), "not found"),
        "unknown method": ({**ok, "merge_method": "frankenmerge"}, "unknown merge_method"),
        "density out of range": ({**ok, "merge_method": "ties", "models": [
            {"model": str(b), "parameters": {"weight": 0.5, "density": 1.5}}]}, "out of range"),
        "negative linear weight": ({"merge_method": "linear", "models": [
            {"model": str(a), "parameters": {"weight": -1}}, {"model": str(b), "parameters": {"weight": 1}}]},
            "out of range"),
        "unknown parameter": ({**ok, "models": [{"model": str(b), "parameters": {"wieght": 0.5}}]}, "wieght"),
        "missing weight": ({**ok, "models": [{"model": str(b)}]}, "no value for parameter 'weight'"),
        "shape mismatch": (other(wide), "shape mismatch"),
        "vocabulary mismatch": (other(big_vocab), "vocabulary sizes differ"),
        "unmatched tensor": (other(deep), "has no counterpart"),
        "pickled weights": (other(pickled), "pytorch_model.bin"),
        "slices form": ({**ok, "slices": [{"sources": []}]}, "slices"),
        "layer range past the model": ({**ok, "layers": [{"layer_range": [2, 9], "source": str(b)}]}, "goes past"),
        "no base for ties": ({"merge_method": "ties", "models": ok["models"]}, "needs a base_model"),
    }


def test_bad_input_exits_2_and_writes_nothing(tmp_path, make_llama, capsys):
    a, b = make_llama("a", 1), make_llama("b", 2)
    for name, (config, message) in _bad_cases(a, b, tmp_path, make_llama).items():
        before = set(tmp_path.iterdir())
        rc, out = merge(tmp_path, config, "out")
        err = capsys.readouterr().err
        assert rc == 2, name
        assert message in err and err.count("\n") == 1, (name, err)
        assert set(tmp_path.iterdir()) - before <= {tmp_path / "out.yaml"}, name  # no output, no temp dir
    (tmp_path / "taken").mkdir()
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(a), "parameters": {
        "weight": 1}}]}))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "taken")]) == 2
    assert "exists" in capsys.readouterr().err and not any((tmp_path / "taken").iterdir())
    cfg.write_text("merge_method: [unclosed")
    assert main(["merge", str(cfg), "--out", str(tmp_path / "x")]) == 2 and "not valid YAML" in capsys.readouterr().err


def test_the_shipped_example_configs_validate():
    from vlsafe.merge.sweep import eval_settings, points

    root = Path(__file__).resolve().parents[1] / "configs" / "merge"
    for path in sorted(root.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "grid" in data:
            grid, _ = points(path)
            assert all(parse(point["config"], str(path)) for point in grid)
            assert eval_settings(path) is not None  # the shipped sweep evaluates
        else:
            parse(data, str(path))


def test_magnitude_ties_keep_exactly_the_asked_fraction():
    delta = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 0.5, 2.0, 1.0])  # five magnitudes tie at the threshold
    kept = methods.magnitude_prune(delta, density=0.5)
    assert int((kept != 0).sum()) == 4 and kept[6] == 2.0
