"""Layer analysis on pico checkpoints with planted structure: changed layers are found and only those, task vectors
built with known cosines report them, a planted refusal direction comes back, emitted and published merge configs
merge with `vlsafe merge` and move exactly what they say; analysis.json matches ANALYSIS.md; bad input exits 2."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from vlsafe.analysis import activations, merges
from vlsafe.cli import main

HIDDEN, LAYERS, VOCAB = 16, 6, 64
SCHEMA_DOC = Path(__file__).resolve().parents[1] / "vlsafe" / "analysis" / "ANALYSIS.md"


def llama_shapes(layers: int = LAYERS, hidden: int = HIDDEN) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        return config, {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}


def random_tensors(seed: int, **dims) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) for k, s in sorted(llama_shapes(**dims)[1].items())}


def save_llama(path: Path, tensors: dict, **dims) -> Path:
    llama_shapes(**dims)[0].save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def load_dir(path: Path) -> dict:
    with safe_open(Path(path) / "model.safetensors", "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def layer_of(key: str):
    match = re.search(r"\.layers\.(\d+)\.", key)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------------ the schema
def documented_fields() -> dict[str, tuple[set, set]]:
    """Per `### heading` of ANALYSIS.md: (all fields of its table, the optional ones)."""
    sections: dict[str, tuple[set, set]] = {}
    current = None
    for line in SCHEMA_DOC.read_text().splitlines():
        if line.startswith("### "):
            current = line[4:].strip()
            sections[current] = (set(), set())
        match = re.match(r"\| `(\w+)` \|(.*)\|$", line)
        if current and match:
            sections[current][0].add(match.group(1))
            if "(only " in match.group(2) or "only with" in match.group(2):
                sections[current][1].add(match.group(1))
    return sections


def check_schema(obj: dict, sections: list[str]) -> None:
    doc = documented_fields()
    fields = set().union(*(doc[s][0] for s in sections))
    optional = set().union(*(doc[s][1] for s in sections))
    assert set(obj) <= fields, f"undocumented: {set(obj) - fields}"
    assert fields - optional <= set(obj), f"missing: {fields - optional - set(obj)}"


# ------------------------------------------------------------------------------------------------ weights
def test_only_the_changed_layers_are_found_to_differ(tmp_path):
    base, noise = random_tensors(0), random_tensors(1)
    # layers 2 and 3 move by exactly 10% of each tensor's norm (a random direction, seeded)
    changed = {k: v + (0.1 * v.norm() / noise[k].norm() * noise[k] if layer_of(k) in (2, 3) else 0)
               for k, v in base.items()}
    a, b = save_llama(tmp_path / "a", base), save_llama(tmp_path / "b", changed)
    assert main(["analyze", "weights", "--base", str(a), "--models", str(b), "--out", str(tmp_path / "an")]) == 0
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    check_schema(result, ["`header` fields (both kinds)", "`weights` analysis.json"])
    for row in result["weights"]:
        check_schema(row, ["`weights` rows"])
        assert row["model"] == "b"
        moved = row["layer"] in (2, 3) or (row["layer"] is None and row["module"] == "*")
        assert (row["relative_change"] > 0.05) == moved, row
        if not moved:
            assert row["relative_change"] == 0.0
    modules = {r["module"] for r in result["weights"] if r["layer"] == 2}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "input_layernorm",
            "post_attention_layernorm", "*"} == modules
    outside = {r["module"] for r in result["weights"] if r["layer"] is None}
    assert {"embed_tokens", "lm_head", "norm", "*"} == outside
    assert result["figures"] == ["weights_heatmap.png"] and (tmp_path / "an" / "weights_heatmap.png").stat().st_size


PLANTED_COSINES = {0: 0.9, 1: 0.3, 2: -0.5, 3: -1.0, 4: 0.0, 5: 1.0}


def chain_with_known_cosines(tmp_path) -> tuple[Path, Path, Path]:
    """base -> adapted = base + d1 -> safe = adapted + d2, with cos(d1, d2) per layer as planted (exactly per
    tensor, so exactly per layer); outside the layers d2 = 0."""
    base = random_tensors(0)
    generator = torch.Generator().manual_seed(7)
    adapted, safe = {}, {}
    for key, weight in base.items():
        g1, g2 = torch.randn(weight.shape, generator=generator), torch.randn(weight.shape, generator=generator)
        u = g1 / g1.norm()
        w = g2 - (g2.flatten() @ u.flatten()) * u
        w = w / w.norm()
        c = PLANTED_COSINES.get(layer_of(key))
        d1 = 0.05 * weight.norm() * u
        d2 = torch.zeros_like(u) if c is None else 0.05 * weight.norm() * (c * u + math.sqrt(1 - c * c) * w)
        adapted[key] = weight + d1
        safe[key] = adapted[key] + d2
    return (save_llama(tmp_path / "base", base), save_llama(tmp_path / "adapted", adapted),
            save_llama(tmp_path / "safe", safe))


def test_task_vectors_report_the_planted_cosines_and_the_gated_merge_moves_those_layers(tmp_path):
    base, adapted, safe = chain_with_known_cosines(tmp_path)
    emitted = tmp_path / "gated.yaml"
    assert main(["analyze", "weights", "--base", str(base), "--models", str(adapted), str(safe), "--out",
                 str(tmp_path / "an"), "--emit-merge", str(emitted)]) == 0
    result = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert result["task_vector_pairs"] == [{"a": "adapted-base", "b": "safe-adapted"}]
    per_layer = {r["layer"]: r for r in result["task_vectors"] if r["layer"] is not None}
    for layer, cosine in PLANTED_COSINES.items():
        check_schema(per_layer[layer], ["`task_vectors` rows"])
        assert per_layer[layer]["cosine"] == pytest.approx(cosine, abs=1e-4)
    assert per_layer[3]["sign_conflict_rate"] == 1.0 and per_layer[5]["sign_conflict_rate"] == 0.0
    assert 0.4 < per_layer[4]["sign_conflict_rate"] < 0.6  # orthogonal updates: signs agree by chance
    assert "task_vector_cosine.png" in result["figures"]

    # the emitted SafeMERGE-style config applies the safety update where the cosine is below 0: layers 2 and 3
    config = yaml.safe_load(emitted.read_text())
    assert [rule["layer_range"] for rule in config["layers"]] == [[2, 4]]
    assert result["emitted_merge"]["layers"] == config["layers"]
    assert main(["merge", str(emitted), "--out", str(tmp_path / "merged")]) == 0
    merged, a, s = load_dir(tmp_path / "merged"), load_dir(adapted), load_dir(safe)
    for key, tensor in merged.items():
        expected = s[key] if layer_of(key) in (2, 3) else a[key]
        assert torch.allclose(tensor, expected, atol=1e-6), key
        if layer_of(key) in (2, 3):
            assert not torch.equal(tensor, a[key])


def test_explicit_pairs_name_task_vectors_by_model_names(tmp_path):
    from vlsafe.analysis.weights import parse_task_vector

    names = ["vlm-1", "vlm-adapted", "vlm-sft"]
    assert parse_task_vector("vlm-sft-vlm-adapted", names).models == ("vlm-sft", "vlm-adapted")
    for bad in ("vlm-sft-nothing", "vlm-sft-vlm-sft"):
        with pytest.raises(Exception, match="task vector"):
            parse_task_vector(bad, names)
    base, adapted, safe = chain_with_known_cosines(tmp_path)
    # safe - base against adapted - base: d1 + d2 against d1
    assert main(["analyze", "weights", "--base", str(base), "--models", str(adapted), "--models", str(safe),
                 "--pair", "safe-base,adapted-base", "--out", str(tmp_path / "an")]) == 0
    rows = json.loads((tmp_path / "an" / "analysis.json").read_text())["task_vectors"]
    layer5 = next(r for r in rows if r["layer"] == 5)  # d2 = d1 there: d1 + d2 = 2 d1
    assert (layer5["a"], layer5["b"], layer5["cosine"]) == ("safe-base", "adapted-base", pytest.approx(1.0))


def test_weights_bad_input_exits_2_naming_the_first_mismatch(tmp_path, capsys):
    a = save_llama(tmp_path / "a", random_tensors(0))
    deeper = save_llama(tmp_path / "deeper", random_tensors(1, layers=LAYERS + 1), layers=LAYERS + 1)
    wider = save_llama(tmp_path / "wider", random_tensors(1, hidden=2 * HIDDEN), hidden=2 * HIDDEN)
    cases = [([str(deeper)], "no tensor matching 'model.layers.6."),
             ([str(wider)], "shape mismatch for 'lm_head.weight'"),
             ([str(tmp_path / "nothing")], "not found")]
    for models, message in cases:
        out = tmp_path / f"out{len(message)}"
        assert main(["analyze", "weights", "--base", str(a), "--models", *models, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert main(["analyze", "weights", "--base", str(a), "--models", str(a), "--pair", "a-b",
                 "--out", str(tmp_path / "x")]) == 2
    assert "task vector" in capsys.readouterr().err


def test_a_vlm_cannot_precede_a_text_llm_in_the_chain(tmp_path, capsys):
    tensors = random_tensors(0)
    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "config.json").write_text(json.dumps({"model_type": "vlsafe_vlm"}))
    vlm_tensors = {f"language_model.{k}": v for k, v in tensors.items()}
    vlm_tensors |= {"projector.linear_1.weight": torch.randn(HIDDEN, 8), "projector.linear_1.bias": torch.zeros(HIDDEN)}
    vlm_tensors["language_model.model.embed_tokens.weight"] = torch.randn(VOCAB + 1, HIDDEN)  # + <image>
    vlm_tensors["language_model.lm_head.weight"] = torch.randn(VOCAB + 1, HIDDEN)
    save_file(vlm_tensors, str(vlm / "model.safetensors"))
    llm = save_llama(tmp_path / "llm", tensors)
    assert main(["analyze", "weights", "--base", str(vlm), "--models", str(llm), "--out", str(tmp_path / "x")]) == 2
    assert "is a text LLM but follows the VLM" in capsys.readouterr().err
    # the other way round is the pipeline's direction: the LLM's layers line up with the VLM's language model
    assert main(["analyze", "weights", "--base", str(llm), "--models", str(vlm), "--out", str(tmp_path / "ok")]) == 0
    result = json.loads((tmp_path / "ok" / "analysis.json").read_text())
    layers = [r for r in result["weights"] if r["layer"] is not None]
    assert layers and all(r["relative_change"] == 0.0 for r in layers)  # same decoder weights under other names
    assert not any(r["module"] == "projector" for r in result["weights"])  # the LLM base has none
    assert result["vocab_rows"]["model.embed_tokens.weight"] == {"compared_rows": VOCAB,
                                                                  "rows": {"llm": VOCAB, "vlm": VOCAB + 1}}


# ------------------------------------------------------------------------------------------------ merges
def _merge(tmp_path, config: dict, name: str) -> dict:
    path = merges.write(config, tmp_path / f"{name}.yaml", name)
    assert main(["merge", str(path), "--out", str(tmp_path / name)]) == 0
    return load_dir(tmp_path / name)


def test_resta_and_expo_are_their_formulas(tmp_path):
    unaligned, aligned, adapted = (save_llama(tmp_path / n, random_tensors(s)) for n, s in
                                   (("unaligned", 0), ("aligned", 1), ("adapted", 2)))
    u, a, d = load_dir(unaligned), load_dir(aligned), load_dir(adapted)
    merged = _merge(tmp_path, merges.resta(str(adapted), str(aligned), str(unaligned), scale=0.7), "resta")
    for key in d:
        assert torch.allclose(merged[key], d[key] + 0.7 * (a[key] - u[key]), atol=1e-5), key
    merged = _merge(tmp_path, merges.expo(str(aligned), str(unaligned), alpha=0.5), "expo")
    for key in d:
        assert torch.allclose(merged[key], a[key] + 0.5 * (a[key] - u[key]), atol=1e-5), key


def test_safety_layer_merge_takes_exactly_the_safety_layers_from_the_aligned_model(tmp_path):
    aligned, adapted = save_llama(tmp_path / "aligned", random_tensors(1)), save_llama(tmp_path / "adapted",
                                                                                       random_tensors(2))
    merged = _merge(tmp_path, merges.safety_layer_merge(str(adapted), str(aligned), (2, 4)), "layers")
    a, d = load_dir(aligned), load_dir(adapted)
    for key, tensor in merged.items():
        assert torch.equal(tensor, a[key] if layer_of(key) in (2, 3) else d[key]), key


def test_the_shipped_published_merge_configs_validate():
    from vlsafe.merge.config import load

    root = Path(__file__).resolve().parents[1] / "configs" / "merge"
    assert load(root / "resta.yaml").models[1].parameters["weight"] < 0
    assert load(root / "expo.yaml").merge_method == "task_arithmetic"


# ------------------------------------------------------------------------------------------------ activations
def test_a_planted_refusal_direction_and_gap_come_back():
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(64, generator=generator)
    direction /= direction.norm()
    harmful = torch.randn(200, 64, generator=generator) + 3 * direction
    benign = torch.randn(200, 64, generator=generator) - 3 * direction
    found, norm = activations.refusal_direction(harmful, benign)
    assert float(found @ direction.double()) > 0.98 and norm == pytest.approx(6, rel=0.1)
    assert activations.mean_projection(harmful, found) - activations.mean_projection(benign, found) > 5
    separated = activations.pair_cosines(harmful, benign)
    # unit noise in 64 dims plus +-3u: cos within a class ~ 9 / 73, across ~ -9 / 73
    assert separated["gap"] == pytest.approx(18 / 73, abs=0.04) and separated["cos_benign_harmful"] < 0
    mixed = activations.pair_cosines(torch.randn(40, 64, generator=generator), torch.randn(40, 64, generator=generator))
    assert abs(mixed["gap"]) < 0.05
    span = activations.locate_safety_layers([0.02, 0.0, 0.01, 0.1, 0.5, 0.9, 1.0, 0.95])
    assert (span["start"], span["end"], span["layer_range"]) == (4, 5, [4, 6])
    flat = activations.locate_safety_layers([0.3, 0.2, 0.1])
    assert flat["start"] is None and flat["reason"]


@pytest.fixture(scope="module")
def pico_models(tmp_path_factory):
    from vlsafe.model import checkpoint
    from vlsafe.model.llms import pico_llm

    root = tmp_path_factory.mktemp("pico")
    llm, tokenizer = pico_llm(seed=0)
    checkpoint.save(checkpoint.Bundle(llm, tokenizer), root / "llm")
    checkpoint.save(checkpoint.build_vlm("pico", "pico", seed=0), root / "vlm")
    other, tokenizer = pico_llm(seed=1)  # same shapes, other weights: a reference whose layers differ
    checkpoint.save(checkpoint.Bundle(other, tokenizer), root / "other")
    return root / "llm", root / "vlm"


def test_activations_end_to_end_on_a_pico_vlm_with_a_reference(pico_models, tmp_path, capsys):
    llm, vlm = pico_models
    out = tmp_path / "act"
    assert main(["analyze", "activations", "--model", str(vlm), "--reference", str(llm), "--conditions",
                 "text,blank", "--n", "8", "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    check_schema(result, ["`header` fields (both kinds)", "`activations` analysis.json"])
    check_schema(result["safety_layers"], ["`safety_layers`"])
    assert [(r["condition"], r["layer"]) for r in result["activations"]] == [
        (c, layer) for c in ("text", "blank") for layer in range(2)]
    for row in result["activations"] + result["reference_activations"]:
        check_schema(row, ["`activations` rows"])
        assert row["n_harmful"] == row["n_benign"] == 8
    # the pico VLM's language model is the pico LLM: under text, its states and direction are the reference's
    text = [r for r in result["activations"] if r["condition"] == "text"]
    for own, ref in zip(text, result["reference_activations"]):
        assert own["direction_cosine"] == pytest.approx(1.0, abs=1e-4)
        assert own["projection_gap"] == pytest.approx(ref["projection_gap"], rel=1e-3)
    assert result["safety_layers"]["model"] == str(llm)
    with safe_open(out / "refusal_directions.safetensors", "pt") as handle:
        assert set(handle.keys()) == {"text", "blank", "reference"} and handle.get_tensor("text").shape == (2, 32)
    assert (out / "activations.png").stat().st_size > 0


def test_activations_emit_a_merge_that_copies_the_references_safety_layers(pico_models, tmp_path):
    llm, vlm = pico_models
    other = llm.parent / "other"
    emitted = tmp_path / "layers.yaml"
    # a random pico reference separates harmful from benign prompts by chance, on some prompt samples and not on
    # others: the test is about copying whatever range was located, so it takes the first sample that locates one
    for seed in range(6):
        status = main(["analyze", "activations", "--model", str(vlm), "--reference", str(other), "--n", "8",
                       "--seed", str(seed), "--out", str(tmp_path / "act"), "--emit-merge", str(emitted)])
        if status == 0:
            break
        assert not (tmp_path / "act").exists() and not emitted.exists()  # the refusal wrote nothing
    assert status == 0
    result = json.loads((tmp_path / "act" / "analysis.json").read_text())
    start, end = result["safety_layers"]["layer_range"]
    assert result["emitted_merge"]["layers"] == [{"layer_range": [start, end], "source": str(other.resolve())}]
    assert main(["merge", str(emitted), "--out", str(tmp_path / "merged")]) == 0
    merged, model, reference = load_dir(tmp_path / "merged"), load_dir(vlm), load_dir(other)
    assert merged.keys() == model.keys()
    for key, tensor in merged.items():
        from_reference = key.startswith("language_model.") and layer_of(key) in range(start, end)
        expected = reference[key.removeprefix("language_model.")] if from_reference else model[key]
        assert torch.equal(tensor, expected), key


def test_activations_bad_input(pico_models, tmp_path, capsys):
    llm, vlm = pico_models
    cases = [(["--model", str(llm), "--conditions", "text,blank"], "text-only LLM"),
             (["--model", str(vlm), "--n", "4"], "at least 8"),
             (["--model", str(vlm), "--conditions", "text,sideways"], "unknown condition 'sideways'"),
             (["--model", "pico", "--emit-merge", str(tmp_path / "m.yaml")], "must be a checkpoint directory")]
    for args, message in cases:
        out = tmp_path / "act"
        assert main(["analyze", "activations", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_blocks_of_rows_give_the_sums_of_whole_tensors(tmp_path, monkeypatch):
    from vlsafe.analysis import weights

    base, adapted, safe = chain_with_known_cosines(tmp_path)
    whole = weights.analyze(str(base), [str(adapted), str(safe)], tmp_path / "whole", progress=False)
    monkeypatch.setattr(weights, "BLOCK_ENTRIES", 40)  # a few rows per block, several blocks per tensor
    blocked = weights.analyze(str(base), [str(adapted), str(safe)], tmp_path / "blocked", progress=False)
    for key in ("weights", "task_vectors"):
        assert len(whole[key]) == len(blocked[key])
        for a, b in zip(whole[key], blocked[key]):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=2e-6) for k in a), (a, b)


def test_tower_probe_reads_shapes_from_frozen_features_at_each_layer(tmp_path, capsys):
    from vlsafe.analysis.tower import probe, scenes

    # the probe's scenes are the held-out kind, with answers, and never the corpus's own draws
    drawn, answers = scenes("shape", 3, "train", 0)
    assert all(s["kind"] == "single" for s in drawn) and answers == [s["objects"][0]["shape"] for s in drawn]
    out = tmp_path / "probe"
    result = probe("efficientnet-lite0", [-1, -2], n=40, tasks=["shape"], out=out)
    assert [(r["layer"], r["channels"], r["tokens"]) for r in result["layers"]] == [(-1, 1280, 49), (-2, 320, 49)]
    # four shapes are plain to an ImageNet tower: far above always answering the commonest one
    assert all(r["accuracy"]["shape"] >= result["chance"]["shape"] + 0.2 for r in result["layers"])
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["kind"] == "tower-probe" and saved["layers"] == result["layers"] and saved["n_test"] == 20
    # a layer the tower lacks, or an existing output folder: one line, exit 2
    assert main(["analyze", "tower", "--layer", "40", "--n", "10"]) == 2
    assert "feature layer 40 does not exist" in capsys.readouterr().err
    assert main(["analyze", "tower", "--n", "10", "--out", str(out)]) == 2
    assert "output path exists" in capsys.readouterr().err
