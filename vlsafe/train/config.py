"""`TrainConfig`: everything one training run needs, validated once from YAML (+ `key=value` overrides).

The same config runs on one CPU process, on several (gloo) and on GPUs under DDP / FSDP / DeepSpeed: how many
processes there are is accelerate's business (`accelerate launch --config_file configs/accelerate/...`), and
`batch_size` is the global batch per optimizer step, so a config means the same optimisation at every scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from vlsafe.config import Strict, load_config

STAGES = ("align", "projector", "full", "safety-sft", "mixed", "dpo")
# the language model's linear layers in Llama / SmolLM2 / Mistral / Qwen2 naming: what LLaVA's LoRA recipe targets
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DataSpec(Strict):
    """One training file in a format of `vlsafe.data.formats` whose records are conversations (llava, vlguard)."""

    path: str
    format: str = "llava"
    image_root: str | None = None  # where relative image paths resolve (default: the file's folder)
    skip_bad: bool = False  # leave out (and count) bad records instead of failing on the first
    # stage `mixed` mixes `task` files (the stage-2 data) with `safety` files at `mix_ratio`; stages `full` and
    # `mixed` mix `text` files (text-only instructions) into the task data at `text_ratio`; other stages train on
    # every file, and check the refusals of `safety` files (and of all files in safety-sft / align)
    role: Literal["task", "safety", "text"] = "task"


class LoraSpec(Strict):
    """LoRA on the language model's linear layers; merged back into plain weights in every saved checkpoint."""

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS), min_length=1)


class DpoSpec(Strict):
    """What TRL's DPO loss takes (trl.DPOConfig fields of the same names); the reference is the starting model,
    its log-probs precomputed once before step 1 so no second model is held in memory."""

    beta: float = Field(0.1, gt=0)
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], min_length=1)
    loss_weights: list[float] | None = None
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"

    @model_validator(mode="after")
    def _known(self):
        # the losses trl 1.16's DPOTrainer implements (it would only say so at the first step)
        unknown = [t for t in self.loss_type if t not in DPO_LOSSES]
        if unknown:
            raise ValueError(f"unknown DPO loss {unknown[0]!r} (TRL's: {', '.join(DPO_LOSSES)})")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError("loss_weights needs one weight per loss_type")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("loss 'exo_pair' needs label_smoothing > 0")
        return self


class TrainConfig(Strict):
    """One training run. Every field's help text is its `description`: `vlsafe train --help` and the docs read it."""

    stage: Literal["align", "projector", "full", "safety-sft", "mixed", "dpo"] = Field(
        description="what is trained on what data with which loss (see vlsafe/train/stages.py)")
    model: str = Field(description="a vlsafe VLM directory (projector, full, ...) or any LLM spec (align, dpo): "
                                   "preset, HF directory, hub id")
    data: list[DataSpec] = Field(min_length=1, description="training files (a path, or {path, format, role, ...})")
    out: str = Field(description="a new directory, or the directory of an interrupted run of this config (resumed)")

    lr: float = Field(gt=0, description="peak learning rate (AdamW)")
    projector_lr: float | None = Field(None, gt=0, description="peak learning rate of the projector's weights "
                                                               "(LLaVA's mm_projector_lr); null = lr")
    batch_size: int = Field(gt=0, description="global: examples per optimizer step over all processes and "
                                              "accumulation")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step on each process")
    epochs: int = Field(1, gt=0, description="passes over the data (unless max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="if set, wins over epochs (the data repeats, reshuffled "
                                                          "per epoch)")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="share of steps with linear warm-up")
    schedule: Literal["cosine"] = Field("cosine", description="learning-rate schedule after warm-up")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (never on biases and norms)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null = none")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    max_length: int = Field(2048, gt=0, description="tokens per example (image tokens included); longer is cut")
    seed: int = Field(0, description="batch order, LoRA initialisation, dropout")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware has it, else fp32 (vlsafe/precision.py); bf16 and "
                            "fp16 are mixed precision: fp32 master weights and optimizer state")
    group_by_length: bool = Field(True, description="batches of records of similar length (less padding); which "
                                                    "batch a step sees stays a function of seed and step")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")

    save_every: int = Field(0, ge=0, description="steps between kept checkpoints (the safety-dynamics curve); "
                                                 "0 = final only")
    log_every: int = Field(1, gt=0, description="steps between lines of log.jsonl")
    num_workers: int = Field(0, ge=0, description="DataLoader workers that read images and tokenize")

    template: Literal["chat", "plain"] = Field(
        "chat", description="chat: each conversation in the LLM's chat template (system prompt included); plain "
                            "(stage projector): LLaVA's pre-training format, the image tokens then the caption and "
                            "EOS, with no system prompt and no request (a third of the tokens per example go)")
    lora: LoraSpec | None = Field(None, description="LoRA on the LM instead of full fine-tuning")
    unfreeze_tower: bool = Field(False, description="stage full / safety-sft / mixed / dpo: train the tower too")
    mix_ratio: float | None = Field(None, ge=0.0, le=1.0, description="stage mixed: share of safety examples")
    text_ratio: float | None = Field(None, ge=0.0, le=1.0, description="full / mixed: share of text-only "
                                                                        "examples in the task data")
    dpo: DpoSpec | None = Field(None, description="stage dpo settings (defaults when absent)")

    # written by the engine into out/config.yaml (data hashes, model hash, versions); ignored when read back, so
    # `vlsafe train out/config.yaml` reruns (or resumes) the same run
    provenance: dict = Field(default_factory=dict, description="written by the engine; ignored when read back")

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        # `data: file.json` and `data: {path: ...}` are the common single-file cases
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            value = [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.stage == "projector" and self.lora is not None:
            raise ValueError("stage 'projector' trains the projector in full; LoRA applies to the LM (stage 'full')")
        if self.stage == "projector" and self.unfreeze_tower:
            raise ValueError("stage 'projector' keeps the tower frozen; unfreeze_tower is for stage 'full'")
        if self.template == "plain" and self.stage != "projector":
            raise ValueError(f"template 'plain' is LLaVA's pre-training format, for stage 'projector' only, "
                             f"not {self.stage!r}")
        if self.stage == "align" and self.unfreeze_tower:
            raise ValueError("stage 'align' is text-only: there is no tower to unfreeze")
        if self.stage == "mixed":
            if self.mix_ratio is None:
                raise ValueError("stage 'mixed' needs mix_ratio (the share of safety examples, within [0, 1])")
            roles = {d.role for d in self.data}
            if roles - {"text"} != {"task", "safety"}:
                raise ValueError("stage 'mixed' needs data files of both roles: task (stage-2 data) and safety")
        elif self.mix_ratio is not None:
            raise ValueError(f"mix_ratio applies to stage 'mixed', not {self.stage!r}")
        has_text = any(d.role == "text" for d in self.data)
        if self.text_ratio is not None and self.stage not in ("full", "mixed"):
            raise ValueError(f"text_ratio applies to stages 'full' and 'mixed', not {self.stage!r}")
        if (self.text_ratio is not None) != has_text:
            raise ValueError("text-only mixing needs both text_ratio and data files of role text"
                             if has_text else "text_ratio needs data files of role text (text-only instructions)")
        if self.dpo is not None and self.stage != "dpo":
            raise ValueError(f"dpo settings apply to stage 'dpo', not {self.stage!r}")
        return self

    def resolved(self) -> dict:
        """The config as it defines the run: what a resume must match (provenance is a record, not a setting)."""
        return self.model_dump(mode="json", exclude={"provenance"})


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, list(overrides))
