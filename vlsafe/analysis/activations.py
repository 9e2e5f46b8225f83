"""`vlsafe analyze activations`: where a model tells harmful from benign requests, layer by layer, and how strongly
its harmful requests point along a refusal direction, as text and with images.

Each prompt goes through the model's chat template with the generation prompt, exactly as for generation, and the
output of every decoder layer at the last prompt token (the position the answer starts from) is kept.

- Safety layers (Li et al. 2024, arXiv:2408.17003): per layer, the mean cosine similarity of benign-benign,
  harmful-harmful and benign-harmful pairs; the gap = benign-benign minus benign-harmful (their N-N vs N-M). Our rule
  for where it opens (`locate_safety_layers`): with g_low the smallest gap up to the layer of the largest gap
  g_max, the safety layers run from the first layer whose gap has risen a quarter of the way from g_low to g_max to
  the first whose gap has risen three quarters of the way: the layers over which the separation builds up.
- Refusal direction (Arditi et al. 2024): per layer, mean(harmful) - mean(benign), as a unit vector. Each condition's
  harmful and benign prompts are projected onto the direction of the reference model (an aligned model: does
  adaptation, or an image, weaken the projection?) or, without one, of this model under its first condition.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from vlsafe.analysis.output import header, pyplot, rounded
from vlsafe.data.records import Prompt
from vlsafe.errors import VlsafeError

MIN_PER_CLASS = 8  # below this, a mean pairwise cosine or a mean difference is mostly noise
DEFAULT_N = 64
RISE = (0.25, 0.75)  # the fractions of the gap's rise that open and close the safety layers


# ------------------------------------------------------------------------------------------------ pure functions
def mean_pair_cosine(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> float:
    """Mean cosine over all pairs (i < j within x when y is None, else every (x_i, y_j))."""
    a = torch.nn.functional.normalize(x.double(), dim=-1)
    if y is None:
        n = a.shape[0]
        sims = a @ a.T
        return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
    b = torch.nn.functional.normalize(y.double(), dim=-1)
    return float((a @ b.T).mean())


def pair_cosines(harmful: torch.Tensor, benign: torch.Tensor) -> dict:
    """Li et al.'s three similarities for one layer and their gap (benign-benign minus benign-harmful)."""
    bb, hh, bh = mean_pair_cosine(benign), mean_pair_cosine(harmful), mean_pair_cosine(benign, harmful)
    return {"cos_benign_benign": bb, "cos_harmful_harmful": hh, "cos_benign_harmful": bh, "gap": bb - bh}


def refusal_direction(harmful: torch.Tensor, benign: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(unit vector of mean(harmful) - mean(benign), the difference's norm)."""
    diff = harmful.double().mean(0) - benign.double().mean(0)
    norm = float(diff.norm())
    return (diff / norm if norm > 0 else diff), norm


def mean_projection(states: torch.Tensor, direction: torch.Tensor) -> float:
    return float((states.double() @ direction.double()).mean())


def locate_safety_layers(gaps: Sequence[float], rise: tuple[float, float] = RISE) -> dict:
    """The layer range where the benign-harmful gap opens (rule in the module docstring); start and end inclusive,
    `layer_range` half-open as merge configs take it. No rise at all: start and end are None, with the reason."""
    rule = (f"g_low = smallest gap up to the layer of the largest gap g_max; start = first layer whose gap is "
            f"g_low + {rise[0]} (g_max - g_low) or more, end = first layer whose gap is g_low + {rise[1]} "
            "(g_max - g_low) or more; the gap is mean cos(benign, benign) - mean cos(benign, harmful) of the last "
            "prompt token's layer output")
    top = max(range(len(gaps)), key=lambda i: gaps[i])
    low = min(range(top + 1), key=lambda i: gaps[i])
    opening = gaps[top] - gaps[low]
    if not opening > 1e-9:
        return {"start": None, "end": None, "layer_range": None, "rule": rule,
                "reason": "the gap never rises: no layer separates harmful from benign prompts more than the first"}
    start = next(i for i in range(low, top + 1) if gaps[i] - gaps[low] >= rise[0] * opening)
    end = next(i for i in range(start, top + 1) if gaps[i] - gaps[low] >= rise[1] * opening)
    return {"start": start, "end": end, "layer_range": [start, end + 1], "rule": rule, "reason": None,
            "gap_low": rounded(gaps[low]), "gap_max": rounded(gaps[top]), "gap_max_layer": top}


# ------------------------------------------------------------------------------------------------ prompts
def _sample(prompts: list[Prompt], n: int, seed: int) -> list[Prompt]:
    prompts = sorted(prompts, key=lambda p: p.id)  # sampling must not depend on file order
    return prompts if n >= len(prompts) else random.Random(seed).sample(prompts, n)


def prompt_sets(n: int = DEFAULT_N, seed: int = 0, corpus=None) -> tuple[list[Prompt], list[Prompt]]:
    """(harmful, benign), n each (seeded): harmful from HarmBench (test, without the long contextual behaviours)
    and StrongREJECT; benign from the over-refusal set's benign prompts and the text helpfulness questions, plus
    the held-out image questions of `corpus` (a `vlsafe data synth` directory) when given."""
    from vlsafe.eval import benchmarks

    if n < MIN_PER_CLASS:
        raise VlsafeError(f"n={n} prompts per class is too few for a stable estimate: at least {MIN_PER_CLASS} "
                          "harmful and benign prompts are needed")
    harmful = [p for p in benchmarks.harmbench("test") if p.meta.get("functional_category") != "contextual"]
    harmful += benchmarks.strongreject()
    benign = [p for p in benchmarks.overrefusal() if p.label == "benign"] + benchmarks.text_helpfulness()
    if corpus is not None:
        from vlsafe.data.synthetic import load_heldout

        corpus = Path(corpus)
        benign += load_heldout(corpus / "eval_heldout.jsonl" if corpus.is_dir() else corpus)
    return _sample(harmful, n, seed), _sample(benign, n, seed)


# ------------------------------------------------------------------------------------------------ hidden states
def decoder_layers(bundle) -> torch.nn.ModuleList:
    language_model = bundle.model.language_model if bundle.is_vlm else bundle.model
    layers = getattr(language_model.get_decoder(), "layers", None)
    if layers is None:
        raise VlsafeError(f"{bundle.source}: cannot find the decoder layers of {type(language_model).__name__}")
    return layers


def last_token_states(bundle, prompts: list[Prompt], batch_size: int = 16, progress=None) -> torch.Tensor:
    """(prompts, layers, hidden) float32: every decoder layer's output at the last prompt token."""
    fmt, model = bundle.formatter(), bundle.model
    layers = decoder_layers(bundle)
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(hidden[:, -1].float())  # left padding: the last column is every row's last token

    handles = [layer.register_forward_hook(keep) for layer in layers]
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            batch = fmt.collate([fmt.encode_prompt(p.text, p.image, record_id=p.id) for p in chunk],
                                padding_side="left")
            batch.pop("labels")
            # positions that skip the left padding, as generation uses them
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            captured.clear()
            with torch.inference_mode():
                model(**batch, position_ids=positions, logits_to_keep=1)
            out.append(torch.stack(captured, dim=1))
            if progress is not None:
                progress(len(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(out)


def _condition_prompts(bundle, prompts: list[Prompt], condition: str, image_dir: Path) -> list[Prompt]:
    from vlsafe.eval import benchmarks

    shown = benchmarks.expand(prompts, condition, image_dir)
    if not bundle.is_vlm:  # the text condition of a text LLM: images that came with a prompt are dropped too
        shown = [p.model_copy(update={"image": None}) for p in shown]
    return shown


def measure(bundle, harmful: list[Prompt], benign: list[Prompt], condition: str, image_dir: Path,
            batch_size: int = 16, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(harmful states, benign states) under `condition`, each (prompts, layers, hidden)."""
    states = last_token_states(bundle, _condition_prompts(bundle, harmful + benign, condition, image_dir),
                               batch_size, progress)
    return states[:len(harmful)], states[len(harmful):]


def layer_rows(harmful: torch.Tensor, benign: torch.Tensor, directions: torch.Tensor, condition: str) -> list[dict]:
    """One row per layer: the pair cosines and gap, the own refusal direction's norm and its cosine with
    `directions` (layers, hidden; unit rows), and the mean projections onto `directions`."""
    rows = []
    for layer in range(harmful.shape[1]):
        h, b = harmful[:, layer], benign[:, layer]
        own, norm = refusal_direction(h, b)
        ref = directions[layer].double()
        row = {"condition": condition, "layer": layer, "n_harmful": h.shape[0], "n_benign": b.shape[0],
               **{k: rounded(v) for k, v in pair_cosines(h, b).items()},
               "direction_norm": rounded(norm),
               "direction_cosine": rounded(float(own @ ref)) if norm > 0 and float(ref.norm()) > 0 else None,
               "harmful_projection": rounded(mean_projection(h, ref)),
               "benign_projection": rounded(mean_projection(b, ref))}
        row["projection_gap"] = rounded(row["harmful_projection"] - row["benign_projection"])
        rows.append(row)
    return rows


def _directions(harmful: torch.Tensor, benign: torch.Tensor) -> torch.Tensor:
    return torch.stack([refusal_direction(harmful[:, i], benign[:, i])[0] for i in range(harmful.shape[1])]).float()


# ------------------------------------------------------------------------------------------------ the command
def analyze(model: str, out, reference: Optional[str] = None, conditions: Sequence[str] = ("text",),
            n: int = DEFAULT_N, corpus=None, seed: int = 0, batch_size: int = 16, emit_merge=None,
            progress: bool = True) -> dict:
    """Writes the new directory `out` (analysis.json, refusal_directions.safetensors, activations.png) and returns
    the analysis.json object. `emit_merge`: also write a merge YAML taking `reference`'s weights in the safety
    layers and `model`'s elsewhere (merges.safety_layer_merge)."""
    from safetensors.torch import save_file

    from vlsafe.eval import benchmarks
    from vlsafe.io import atomic_dir, write_json
    from vlsafe.progress import Steps
    from vlsafe.model import checkpoint

    out = Path(out)
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    conditions = list(dict.fromkeys(conditions))
    if not conditions:
        raise VlsafeError("--conditions is empty (known: " + ", ".join(benchmarks.TEXT_CONDITIONS) + ")")
    for condition in conditions:
        if condition not in benchmarks.TEXT_CONDITIONS:
            raise VlsafeError(f"unknown condition {condition!r} (known: {', '.join(benchmarks.TEXT_CONDITIONS)})")
    if emit_merge is not None:
        for role, spec in (("--model", model), ("--reference", reference)):
            if spec is None or not Path(spec).is_dir():
                raise VlsafeError(f"--emit-merge copies the safety layers of --reference into --model: {role} must "
                                  f"be a checkpoint directory (got {spec!r})")
    harmful, benign = prompt_sets(n, seed, corpus)
    if min(len(harmful), len(benign)) < MIN_PER_CLASS:
        raise VlsafeError(f"only {len(harmful)} harmful and {len(benign)} benign prompts: at least {MIN_PER_CLASS} "
                          "of each are needed")
    image_conditions = [c for c in conditions if c != "text"]
    if image_conditions and not is_vlm_spec(model):  # said before minutes of loading
        raise VlsafeError(f"condition {image_conditions[0]!r} shows an image, but {model} is a text-only LLM "
                          "(use --conditions text, or give a VLM)")
    bundle = checkpoint.load(model)
    ref_bundle = checkpoint.load(reference) if reference is not None else None
    if ref_bundle is not None:
        _check_reference(bundle, ref_bundle, model, reference)

    total = (len(harmful) + len(benign)) * (len(conditions) + (ref_bundle is not None))
    with atomic_dir(out) as tmp, Steps("hidden states", total, unit="items", enabled=progress) as bar:
        advance = bar.advance
        measured = {c: measure(bundle, harmful, benign, c, tmp / "images", batch_size, advance) for c in conditions}
        if ref_bundle is not None:
            ref_states = measure(ref_bundle, harmful, benign, "text", tmp / "images", batch_size, advance)
            source = {"model": str(reference), "condition": "text"}
        else:
            ref_states = measured[conditions[0]]
            source = {"model": str(model), "condition": conditions[0]}
        directions = _directions(*ref_states)
        rows = [row for c in conditions for row in layer_rows(*measured[c], directions, c)]
        ref_rows = layer_rows(*ref_states, directions, "text") if ref_bundle is not None else None
        located_rows = ref_rows or [r for r in rows if r["condition"] == conditions[0]]
        safety_layers = {**locate_safety_layers([r["gap"] for r in located_rows]),
                         "model": source["model"], "condition": source["condition"]}
        # (layers, hidden) per condition, and the reference's: a later analysis or a steering experiment reads them
        tensors = {c: _directions(*measured[c]).contiguous() for c in conditions} | {"reference": directions}
        save_file(tensors, str(tmp / "refusal_directions.safetensors"), metadata={"format": "pt"})

        result = header("activations")
        result.update({
            "model": {"spec": str(model), "is_vlm": bundle.is_vlm, "num_layers": len(decoder_layers(bundle))},
            "reference": {"spec": str(reference), "is_vlm": ref_bundle.is_vlm} if ref_bundle is not None else None,
            "direction_source": source,
            "prompts": {"n_harmful": len(harmful), "n_benign": len(benign), "seed": seed, "minimum": MIN_PER_CLASS,
                        "harmful_sources": sorted({p.source for p in harmful}),
                        "benign_sources": sorted({p.source for p in benign}),
                        "harmful_ids": [p.id for p in harmful], "benign_ids": [p.id for p in benign]},
            "conditions": conditions,
            "activations": rows,
            "reference_activations": ref_rows,
            "safety_layers": safety_layers,
        })
        result["figures"] = plot(result, tmp)
        if emit_merge is not None:
            from vlsafe.analysis import merges

            if safety_layers["layer_range"] is None:
                raise VlsafeError(f"no safety layers located ({safety_layers['reason']}): nothing to emit a merge from")
            config = merges.safety_layer_merge(str(Path(model).resolve()), str(Path(reference).resolve()),
                                               safety_layers["layer_range"])
            merges.write(config, emit_merge, f"from `vlsafe analyze activations`: {reference}'s weights in its safety "
                         f"layers {safety_layers['start']}..{safety_layers['end']}, {model}'s elsewhere")
            result["emitted_merge"] = {"path": str(emit_merge), **merges.describe(config)}
        write_json(tmp / "analysis.json", result)
    return result


def is_vlm_spec(spec) -> bool:
    """Whether `checkpoint.load(spec)` gives a VLM, read from config.json alone (every other spec is an LLM)."""
    import json

    from vlsafe.model.vlm import VlmConfig

    config = Path(spec) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("model_type") == VlmConfig.model_type
    except ValueError:
        return False  # checkpoint.load names the broken file


def _check_reference(bundle, ref_bundle, model: str, reference: str) -> None:
    """A direction lives in one hidden space: the reference must have the same depth and width."""
    def shape(b):
        return len(decoder_layers(b)), b.model.get_input_embeddings().weight.shape[1]

    if shape(bundle) != shape(ref_bundle):
        raise VlsafeError(f"reference {reference} has {shape(ref_bundle)[0]} layers of width {shape(ref_bundle)[1]} "
                          f"but {model} has {shape(bundle)[0]} of width {shape(bundle)[1]}: its refusal direction "
                          "does not apply")


def plot(result: dict, out: Path) -> list[str]:
    """activations.png: the three pair similarities (first condition), the gap per condition with the safety
    layers shaded, and the harmful-minus-benign projection onto the refusal direction per condition."""
    plt = pyplot()
    rows = result["activations"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    first = [r for r in rows if r["condition"] == result["conditions"][0]]
    layers = [r["layer"] for r in first]
    for key, label in (("cos_benign_benign", "benign-benign"), ("cos_harmful_harmful", "harmful-harmful"),
                       ("cos_benign_harmful", "benign-harmful")):
        axes[0].plot(layers, [r[key] for r in first], marker="o", label=label)
    axes[0].set_title(f"mean pair cosine ({result['conditions'][0]})")
    span = result["safety_layers"]
    for condition in result["conditions"]:
        group = [r for r in rows if r["condition"] == condition]
        axes[1].plot(layers, [r["gap"] for r in group], marker="o", label=condition)
        axes[2].plot(layers, [r["projection_gap"] for r in group], marker="o", label=condition)
    if result.get("reference_activations"):
        ref = result["reference_activations"]
        axes[1].plot(layers, [r["gap"] for r in ref], ls="--", color="black", label="reference (text)")
        axes[2].plot(layers, [r["projection_gap"] for r in ref], ls="--", color="black", label="reference (text)")
    if span["start"] is not None:
        axes[1].axvspan(span["start"] - 0.5, span["end"] + 0.5, color="tab:red", alpha=0.12, label="safety layers")
    axes[1].set_title("gap: cos(benign, benign) - cos(benign, harmful)")
    axes[2].set_title(f"projection on the refusal direction of {Path(result['direction_source']['model']).name}\n"
                      "(mean harmful - mean benign)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(out / "activations.png", dpi=110)
    plt.close(fig)
    return ["activations.png"]
