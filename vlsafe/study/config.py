"""`StudyConfig`: the whole experiment of `vlsafe study` as one validated YAML (configs/studies/NAME.yaml).

A profile is such a file; `--profile NAME` picks configs/studies/NAME.yaml, and a config may start from a profile
with `extends: NAME` (its keys then replace the profile's, section by section). Every training arm's settings are
`vlsafe train` fields (TrainConfig) laid over `train.defaults`; `data`, `model` and `out` are filled in by the study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from vlsafe.config import Strict, read_yaml, validate
from vlsafe.errors import VlsafeError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "studies"
ARMS = ("control", "safety_sft", "mixed", "dpo")  # the optional arms; align, stage 1 and stage 2 always run
MERGE_PARTNERS = ("aligned", "safety_sft", "dpo", "mixed")  # what the adapted VLM may be merged with
MERGE_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")


class DataFile(Strict):
    """An existing file in a published format; replaces the study's built-in generator of that data."""
    path: str
    format: str = "llava"
    image_root: str | None = None


class CorpusSpec(Strict):
    n: int = Field(600, gt=0)  # training images of `vlsafe data synth`
    seed: int = 0


class AlignDataSpec(Strict):
    n_harmful: int = Field(300, gt=0)
    max_new_tokens: int = Field(80, gt=0)


class VlguardLikeSpec(Strict):
    n: int = Field(200, gt=0)


class PairsSpec(Strict):
    n_harmful: int = Field(240, gt=0)
    n_benign: int = Field(120, gt=0)
    max_new_tokens: int = Field(64, gt=0)


class DataSpecs(Strict):
    """External data (paper scale). Each one given replaces what the study would otherwise build offline."""
    align: DataFile | None = None  # text conversations for stage `align`
    stage1: DataFile | None = None  # e.g. LLaVA-Pretrain (format llava)
    stage2: DataFile | None = None  # e.g. LLaVA-Instruct-665K (format llava)
    safety: DataFile | None = None  # e.g. VLGuard train (format vlguard)
    pairs: DataFile | None = None  # e.g. SPA-VL / PKU-SafeRLHF (format spavl / saferlhf)


class MergeSweep(Strict):
    """Merges of the adapted VLM with each partner, for each method and weight (the partner's share)."""
    methods: list[Literal[MERGE_METHODS]] = ["linear"]  # type: ignore[valid-type]
    weights: list[float] = [0.3, 0.6]
    partners: list[str] = ["aligned", "safety_sft", "dpo"]
    density: float = Field(0.5, gt=0, le=1)  # ties / dare / breadcrumbs


class EvalSpec(Strict):
    suite: str = "study"  # a packaged suite name or a suite .yaml
    n_harmful: int | None = None  # items per harmful benchmark (None: the suite's)
    n_benign: int | None = None  # items per over-refusal / helpfulness benchmark (None: the suite's)
    n_heldout: int | None = None  # held-out image questions of the corpus (None: the suite's)
    max_new_tokens: int | None = None
    judges: list[str] | None = None  # None: the suite's; the first judge decides the claims
    batch_size: int = Field(16, gt=0)
    # evaluate stage 2's checkpoints (the safety-dynamics curve): of every seed, of the first seed only, or none
    checkpoints: Literal[True, False, "first_seed"] = True
    legibility_items: int = Field(24, gt=0)  # the legibility probe's rendered words per VLM
    # the generation precision of every evaluation (`vlsafe eval --dtype`): fp32, whose greedy answers do not depend
    # on the batch, unless a profile trades verdict agreement for speed (vlsafe/precision.py has the measurement)
    dtype: Literal["fp32", "bf16", "auto"] = "fp32"


class Fp32Rates(Strict):
    """The per-token constants measured on a CPU without native bf16, where every stage runs in fp32."""
    train_token_s: float = Field(gt=0)
    projector_token_s: float = Field(gt=0)
    generate_token_s: float = Field(gt=0)
    reference_fp32_flops: float = Field(gt=0)  # that CPU's fp32 matmul peak (`vlsafe bench`'s 2048 x 2048)
    reference_params: float | None = Field(None, gt=0)  # the LLM they were measured with (see CostModel)


class CostModel(Strict):
    """Per-unit constants of the dry run's estimate (measured on the profile's machine; see vlsafe/study/dag.py)."""
    train_token_s: float = 2e-4  # seconds per training token (forward + backward + step), full fine-tune
    projector_token_s: float = 1e-4  # seconds per token when only the projector trains
    generate_token_s: float = 5e-3  # seconds per generated token per item, batched
    tokens_per_example: int = 120  # mean tokens of one training example
    fixed_s: float = 5.0  # per stage: loading models, writing files
    merge_s: float = 10.0
    image_s: float = 0.01  # per corpus image drawn
    # the bf16 matmul peak (FLOP/s, `vlsafe bench`'s 2048 x 2048) of the machine these constants were measured on:
    # when set, the estimates are scaled by it over this machine's peak (in the precision the study will use; the
    # fp32 stages by reference_fp32_flops where given), so a CPU half as fast gets an ETA twice as long; None: the
    # constants as they are
    reference_bf16_flops: float | None = None
    # the fp32 matmul peak of that same machine: the stages that compute in fp32 there too (evaluation at
    # `eval.dtype: fp32`, the data builders' own answers, the legibility probe, the layer analysis) are scaled by
    # it over this machine's fp32 peak instead; None: by the bf16 ratio, as training
    reference_fp32_flops: float | None = Field(None, gt=0)
    # the same constants measured on a CPU without native bf16 (training in fp32 there, as evaluation is on both),
    # with that CPU's fp32 peak: such a machine's estimate uses these, scaled by fp32 peaks; None: the constants
    # above, scaled by the bf16 reference over this machine's fp32 peak (which overstated such a CPU about 5x)
    fp32: Fp32Rates | None = None
    # the per-token parameters (vlsafe.model.llms.llm_params) of the LLM these constants were measured with:
    # a study of another LLM (a config that `extends:` a profile and names its own) has its estimates scaled by
    # its count over this one, as its FLOPs per token are; None: the constants as they are
    reference_params: float | None = Field(None, gt=0)

    def on_machine(self, precision: str) -> tuple[CostModel, float | None, str, float | None]:
        """(the constants, their reference peak, its precision, their reference LLM's parameters) for a machine
        whose training precision is `precision` (vlsafe.precision.resolve("auto", ...))."""
        if precision == "fp32" and self.fp32 is not None:
            rates = self.fp32.model_dump(exclude={"reference_fp32_flops", "reference_params"})
            return (self.model_copy(update=rates), self.fp32.reference_fp32_flops, "fp32",
                    self.fp32.reference_params)
        return self, self.reference_bf16_flops, "bf16", self.reference_params


class StudyConfig(Strict):
    name: str = "study"
    llm: str = "smollm2-135m-instruct"
    tower: str = "efficientnet-lite0"
    # the tower layer that feeds the projector (`vlsafe build --feature-layer`); None: the tower's default
    tower_feature_layer: int | None = None
    # auto: align unless the LLM is a known safety-aligned one (SAFETY_ALIGNED below); true / false force it
    align: Literal["auto", True, False] = "auto"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    arms: list[str] = Field(default_factory=lambda: list(ARMS))
    analysis: bool = False  # layer analysis (vlsafe.analysis) and the merges it proposes
    corpus: CorpusSpec = CorpusSpec()
    align_data: AlignDataSpec = AlignDataSpec()
    vlguard_like: VlguardLikeSpec = VlguardLikeSpec()
    pairs: PairsSpec = PairsSpec()
    data: DataSpecs = DataSpecs()
    train: dict[str, dict] = Field(default_factory=dict)  # defaults, align, stage1, stage2, control, safety_sft, ...
    merges: MergeSweep | None = MergeSweep()
    eval: EvalSpec = EvalSpec()
    cost: CostModel = CostModel()
    margin: float = Field(0.05, ge=0, lt=1)  # smallest effect a claim counts (see vlsafe/study/claims.py)

    @model_validator(mode="after")
    def _known_names(self):
        for arm in self.arms:
            if arm not in ARMS:
                raise ValueError(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
        known = {"defaults", "align", "stage1", "stage2", *ARMS}
        for section in self.train:
            if section not in known:
                raise ValueError(f"train.{section}: unknown stage (known: {', '.join(sorted(known))})")
        if self.merges is not None:
            for partner in self.merges.partners:
                if partner not in MERGE_PARTNERS:
                    raise ValueError(f"merges.partners: unknown stage {partner!r} (known: {', '.join(MERGE_PARTNERS)})")
                if partner != "aligned" and partner not in self.arms:
                    raise ValueError(f"merges.partners: {partner!r} is not among the arms that run "
                                     f"({', '.join(self.arms)})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds: a seed is listed twice")
        return self

    def aligns(self) -> bool:
        if self.align == "auto":
            return self.llm not in SAFETY_ALIGNED
        return bool(self.align)

    def arm(self, name: str) -> dict:
        """The `vlsafe train` fields of one arm: train.defaults, then the arm's own (control: stage 2's)."""
        own = self.train.get(name)
        if own is None and name == "control":
            own = self.train.get("stage2", {})
        return {**self.train.get("defaults", {}), **(own or {})}


# LLMs whose makers safety-tuned them: `align: auto` leaves them as they are
SAFETY_ALIGNED = {"qwen2.5-coder-0.5b-instruct", "meta-llama/Llama-2-7b-chat-hf", "allenai/tulu-2-7b",
                  "allenai/tulu-2-dpo-7b"}


def profile_path(name: str) -> Path:
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise VlsafeError(f"unknown study profile {name!r} (known: {known})")
    return path


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_study(path: str | Path | None = None, profile: str | None = None) -> tuple[StudyConfig, Path]:
    """The config of CONFIG.yaml (which may `extends:` a profile) or of a profile; and the file it came from."""
    if path is None:
        path = profile_path(profile or "default")
    path = Path(path)
    data = read_yaml(path)
    parent = data.pop("extends", None) or (profile if profile and path.parent != PROFILE_DIR else None)
    if parent:
        data = _merged(read_yaml(profile_path(parent)), data)
    return validate(StudyConfig, data, str(path)), path
