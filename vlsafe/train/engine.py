"""The one training loop, used by every stage: `train(config)` / `vlsafe train CONFIG.yaml [key=value ...]`.

A `Run` is the recipe, read top to bottom: `setup` (stage, data, model, precision, accelerator, run directory,
the stage's own set-up, resumed state), `train` (accumulate, clip, step, log, checkpoint), `save` (the final
model), `cleanup`. It runs unchanged as one CPU process, as several (gloo) and on GPUs under
DDP / FSDP / DeepSpeed, started by `accelerate launch --config_file configs/accelerate/<kind>.yaml -m vlsafe.cli
train CONFIG.yaml`. Everything that decides the numbers is a function of the config and the step, so a resumed
run continues exactly where the interrupted one stood (tested to 1e-6, in practice bit for bit).

Speed: `dtype: auto` trains in bf16 mixed precision where the hardware has bf16 (fp32 master weights and optimizer
state), the LM head runs only where a label is (stages.label_only_loss), and batches hold records of similar
length (batches.py).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from vlsafe.allocator import tune as tune_allocator
from vlsafe.errors import VlsafeError
from vlsafe.model.chat import IGNORE_INDEX
from vlsafe.train import stages
from vlsafe.train import state as training_state
from vlsafe.train.batches import CHARS_PER_TOKEN, BatchPlan, EncodedRecords, micro_batch_loader, record_length
from vlsafe.train.checkpoints import RunLog, clean_partials, resume_point, write_checkpoint
from vlsafe.train.config import TrainConfig

# a chat template's own tokens (system prompt, role markers) beyond a record's text, for the longest-batch bound
TEMPLATE_TOKENS = 64


# ------------------------------------------------------------------------------------------------------- set-up
def load_data(config: TrainConfig, stage: stages.Stage) -> tuple[list, list[dict]]:
    """Every record of every data file (validated), selected by the stage (mixing), and what provenance records
    of each file."""
    from vlsafe.data import formats

    per_file, info = [], []
    for spec in config.data:
        path = Path(spec.path)
        if not path.exists():
            raise VlsafeError(f"{path}: data file not found")
        loaded = formats.loader(spec.format)(path, image_root=spec.image_root, skip_bad=spec.skip_bad)
        if loaded and not isinstance(loaded[0], stage.record_type):
            raise VlsafeError(f"{path}: format {spec.format!r} holds {type(loaded[0]).__name__} records; stage "
                              f"{stage.name!r} trains on {stage.record_type.__name__} records")
        if stage.needs_vlm is False and any(r.image for r in loaded):
            raise VlsafeError(f"{path}: stage {stage.name!r} is text-only, but some records have images")
        skipped = list(getattr(loaded, "skipped", []))
        for line in skipped[:5]:
            print(f"skipped: {line}", file=sys.stderr)
        per_file.append(list(loaded))
        info.append({"path": str(path.resolve()), "format": spec.format, "role": spec.role,
                     "sha256": _data_hash(path), "records": len(loaded), "skipped": len(skipped)})
    if stage.select is not None:
        records, selection = stage.select(config, per_file, config.data)
        for entry, extra in zip(info, selection.get("files", [])):
            entry.update(extra)
    else:
        records = [r for part in per_file for r in part]
    if not records:
        raise VlsafeError(f"{config.data[0].path}: no records to train on")
    return records, info


def _data_hash(path: Path) -> str:
    from vlsafe.io import sha256_file

    if path.is_file():
        return sha256_file(path)
    # a dataset folder (e.g. VLGuard's): its JSON files; images are too many to hash on every start
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.json*")):
        digest.update(f"{file.relative_to(path)}:{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def make_accelerator(config: TrainConfig, micro_batch_of):
    """(accelerator, precision): the precision `config.dtype` resolves to on the device this process trains on."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from vlsafe import precision as precisions

    # several processes on a machine without GPUs: accelerate picks gloo only when told it is on CPU, and
    # `accelerate launch --cpu` starts a single process unless mpirun is configured, so the processes come from
    # the multi-GPU (torchrun) launcher (configs/accelerate/cpu_2proc.yaml) and the CPU is chosen here
    on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    precision = precisions.resolve(config.dtype, precisions.device_type(on_cpu))
    # mixed precision: accelerate runs the forward under autocast; weights and optimizer state stay fp32.
    # The scheduler is stepped by hand once per optimizer step: accelerate's default would step it once per
    # process per step, which assumes a per-process batch size (ours is global)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum,
                              mixed_precision="no" if precision == "fp32" else precision,
                              step_scheduler_with_optimizer=False, cpu=on_cpu)
    if accelerator.gradient_accumulation_steps != config.grad_accum:
        raise VlsafeError(f"the accelerate config sets gradient_accumulation_steps="
                          f"{accelerator.gradient_accumulation_steps}, the train config grad_accum="
                          f"{config.grad_accum}: remove it from the accelerate config")
    kind = accelerator.distributed_type
    if config.lora is not None and (kind == DistributedType.FSDP or (
            kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3)):
        raise VlsafeError("LoRA with FSDP or ZeRO-3 is not supported yet (adapters would be merged from shards); "
                          "use configs/accelerate/ddp.yaml or deepspeed_zero2.yaml")
    if kind == DistributedType.DEEPSPEED:
        # no dataloader goes through prepare(), so DeepSpeed cannot infer its micro-batch: tell it
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_of(
            accelerator.num_processes)
    return accelerator, precision


def make_optimizer(model, config: TrainConfig, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    named = [(n, p) for n, p in stages.plain_named_parameters(model) if p.requires_grad]

    def own_lr(name: str) -> bool:
        return config.projector_lr is not None and name.startswith("projector.")

    if config.projector_lr is not None and not any(own_lr(n) for n, _ in named):
        raise VlsafeError("projector_lr is set, but the model has no projector (a text LLM)")
    groups = []
    for own, lr in ((True, config.projector_lr), (False, config.lr)):
        params = [p for n, p in named if own_lr(n) == own]
        # the usual split: no weight decay on biases and norm weights (1-d tensors)
        groups += [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    params = [p for _, p in named]
    # fused: one vectorised pass over all tensors instead of a loop of small ops per parameter (measured on 2 cores,
    # SmolLM2-135M: 0.064 vs 0.175 s a step); what `transformers.Trainer` uses by default too
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.adam_betas,
                                  fused=fused or None)
    warmup = int(-(-config.warmup_ratio * total_steps // 1))  # ceil, as transformers' Trainer counts it
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps), warmup


class _Weights:
    """What `checkpoint.save` needs of a model, writing a given state dict: LoRA-merged weights, or the full
    weights that `accelerator.get_state_dict` gathered from FSDP / ZeRO-3 shards."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path, **kwargs):
        self.model.save_pretrained(path, state_dict=self.state_dict, **kwargs)


def save_model(accelerator, model, bundle, path: Path, provenance: dict, final: bool) -> None:
    """Every process calls this (gathering shards needs all); the main one writes an HF-style model dir."""
    from vlsafe.model import checkpoint

    unwrapped = accelerator.unwrap_model(model)
    if stages.is_lora(unwrapped):
        # the final model is made by PEFT's own merge; intermediate ones by the same sum, leaving the model as is
        if final:
            plain = unwrapped.merge_and_unload()
            state = plain.state_dict()
        else:
            plain, state = stages.plain_model(unwrapped), stages.merged_state_dict(unwrapped)
    else:
        plain, state = unwrapped, accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        weights = checkpoint.Bundle(_Weights(plain, state), bundle.tokenizer, bundle.image_processor, bundle.source)
        checkpoint.save(weights, path, provenance=provenance, overwrite=not final)


# ---------------------------------------------------------------------------------------------------------- run
class Run:
    """One training run and everything it holds; `train(config)` drives it: setup, train, save, cleanup."""

    def __init__(self, config: TrainConfig, show_progress: bool = True):
        self.config, self.show_progress = config, show_progress
        self.out = Path(config.out)
        self.stage = stages.get_stage(config.stage)
        self.accelerator = None
        self.context = None  # what the stage's setup made for its loss (DPO: TRL's loss object)
        self.start, self.state = 0, {"tokens": 0, "seconds": 0.0, "losses": []}

    # ---------------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Everything before step 1. Bad input raises before `out` is created (or touched, on a resume)."""
        from accelerate.utils import set_seed

        from vlsafe.io import machine, versions
        from vlsafe.model import checkpoint

        config, stage = self.config, self.stage
        records, data_info = load_data(config, stage)
        if config.template == "plain":
            from vlsafe.model.chat import check_plain

            for record in records:
                check_plain(record)
        self.bundle = checkpoint.load(config.model)
        stages.check_model(stage, self.bundle, config.model)
        self.formatter = self.bundle.formatter(config.max_length)
        self.cleanup()  # an Accelerator made earlier in this process (a Trainer's) would pin its precision
        self.accelerator, self.precision = make_accelerator(
            config, lambda world: config.batch_size // (config.grad_accum * world))
        allocator = tune_allocator(self.accelerator.device.type)
        image_tokens = getattr(self.bundle.model.config, "num_image_tokens", 0)
        lengths = tuple(record_length(r, image_tokens) for r in records) if config.group_by_length else None
        self.plan = BatchPlan(len(records), config.batch_size, config.grad_accum, self.accelerator.num_processes,
                              config.seed, lengths)
        self.total = self.plan.total_steps(config.epochs, config.max_steps)
        if self.total < 1:
            raise VlsafeError(f"{len(records)} records make no full batch of {config.batch_size}")
        resume = resume_point(self.out, config.resolved(), [d["sha256"] for d in data_info])
        set_seed(config.seed)  # LoRA's initialisation and dropout draw from it
        model = stages.prepare_model(self.bundle.model, stage, config)
        # the tokens a batch can reach: the cap, or the longest record (by its characters) where that is shorter
        longest = max(lengths or [record_length(r, image_tokens) for r in records]) // CHARS_PER_TOKEN
        attention = stages.training_attention(model, self.accelerator.device.type,
                                              min(config.max_length, longest + TEMPLATE_TOKENS))
        stages.cache_frozen_casts(model, self.precision, self.accelerator.device.type)
        optimizer, scheduler, warmup = make_optimizer(model, config, self.total)
        self.provenance = {
            "data": data_info, "model": {"spec": config.model, "content_sha256": _model_hash(config.model)},
            "precision": self.precision, "processes": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type), "micro_batch": self.plan.micro_batch,
            "allocator": allocator, "attention": attention,
            "steps": self.total, "warmup_steps": warmup, "steps_per_epoch": self.plan.steps_per_epoch,
            **stages.describe_trainable(model), "versions": versions(), "machine": machine()}
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self._open_run_dir(resume)
        self.records = records
        if stage.setup is not None:
            # before any state is restored: on a resumed run too, what setup computes (DPO's reference
            # log-probs) comes from the starting weights, which is what the reference is
            self.records, self.context = stage.setup(self, records)
        if resume is not None and resume[1] is not None:
            self._restore(*resume)

    def _open_run_dir(self, resume) -> None:
        """Creates the run directory (config.yaml), or cleans an interrupted one for its resume."""
        from vlsafe.config import dump_config

        accelerator = self.accelerator
        accelerator.wait_for_everyone()  # every process has checked `out` before the main one creates it
        if accelerator.is_main_process:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            clean_partials(self.out)
            if resume is None or resume[1] is None:
                tmp = self.out / ".config.yaml.tmp"
                tmp.write_text(dump_config(self.config.model_copy(update={"provenance": self.provenance})))
                tmp.replace(self.out / "config.yaml")
        accelerator.wait_for_everyone()

    def _restore(self, step: int, path: Path) -> None:
        import json

        training_state.load(self.accelerator, self.model, self.optimizer, self.scheduler, path / "training_state")
        self.start, self.state = step, json.loads((path / "trainer_state.json").read_text())
        if self.accelerator.is_main_process:
            print(f"resuming {self.out} from step {step} ({path})", file=sys.stderr)

    # ---------------------------------------------------------------------------------------------------- train
    def train(self) -> None:
        """Steps `start` .. `total`: each is grad_accum micro-batches, a clipped optimizer step, a log line."""
        from vlsafe.progress import Steps

        config, stage, accelerator = self.config, self.stage, self.accelerator
        encode = stage.encode or (_encode_plain if config.template == "plain" else None)
        loader = micro_batch_loader(EncodedRecords(self.records, self.formatter, encode, stage.collate),
                                    self.plan, accelerator.process_index, self.start, self.total, config.num_workers)
        batches = iter(loader)
        count = stage.count or _target_tokens
        self.log = RunLog(self.out, self.start, accelerator.is_main_process)
        bar = Steps(stage.name, self.total, self.start, enabled=self.show_progress and accelerator.is_main_process)
        # no model.train() here: prepare_model left the frozen parts in eval mode (no dropout) on purpose
        with bar:
            for step in range(self.start, self.total):
                began = time.perf_counter()
                micro = [next(batches) for _ in range(config.grad_accum)]
                # target tokens (after the causal shift) and input tokens of the whole step, over all processes
                counts = torch.tensor([sum(count(b) for b in micro),
                                       sum(int(b["attention_mask"].sum()) for b in micro)], device=accelerator.device)
                counts = accelerator.reduce(counts, reduction="sum")
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm, metrics = self._step(micro, counts[0].clamp(min=1))
                seconds = time.perf_counter() - began
                self.state["tokens"] += int(counts[1])
                self.state["seconds"] += seconds
                self.state["losses"].append(loss)
                done = step + 1
                if done % config.log_every == 0 or done == self.total:
                    self.log.write({"step": done, "epoch": round(self.plan.epoch_of(done), 4), "loss": loss,
                                    "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                    "tokens": int(counts[1]), "target_tokens": int(counts[0]),
                                    "tokens_per_s": round(int(counts[1]) / seconds, 1), **metrics})
                bar.update(done, info=f"loss {loss:.4f}  lr {lr:.2e}")
                if config.save_every and done % config.save_every == 0:
                    self.save_checkpoint(done)
        self.log.close()

    def _step(self, micro: list[dict], num_items: torch.Tensor) -> tuple[float, object, dict]:
        """One optimizer step over this process's micro-batches: (loss over all processes, grad norm, metrics)."""
        accelerator, config = self.accelerator, self.config
        step_loss = torch.zeros((), device=accelerator.device)
        metrics: dict[str, float] = {}
        grad_norm = None
        for batch in micro:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(self.model):
                loss = self.stage.loss(self, batch, num_items)
                if isinstance(loss, tuple):  # (loss, metrics): a mean over the step's micro-batches
                    loss, extra = loss
                    for key, value in extra.items():
                        metrics[key] = metrics.get(key, 0.0) + value / config.grad_accum
                # backward divides by grad_accum and DDP averages over processes: undo both, so the gradient
                # is the mean over every target token of the global batch, as on one process without
                # accumulation (DeepSpeed scales the same way in its own backward)
                accelerator.backward(loss * config.grad_accum * accelerator.num_processes)
                step_loss += loss.detach()
                if accelerator.sync_gradients:
                    if config.max_grad_norm is not None:
                        params = [p for p in self.model.parameters() if p.requires_grad]
                        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
        if metrics:  # the mean over processes
            values = accelerator.reduce(torch.tensor(list(metrics.values()), device=accelerator.device), "mean")
            metrics = {k: round(float(v), 6) for k, v in zip(metrics, values)}
        return float(accelerator.reduce(step_loss, reduction="sum")), grad_norm, metrics

    # ----------------------------------------------------------------------------------------------------- save
    def _provenance(self, **extra) -> dict:
        """What every saved model of this run records: stage, config, precision, parent model, data."""
        return {"command": "train", "stage": self.config.stage, "config": self.config.resolved(),
                "precision": self.precision, **extra, "parent": self.provenance["model"],
                "data": self.provenance["data"]}

    def save_checkpoint(self, step: int) -> None:
        """checkpoints/step-N: the model (evaluable) and the training state a resume continues from."""
        snapshot = self._provenance(step=step)
        write_checkpoint(self.accelerator, self.out, step,
                         lambda path: save_model(self.accelerator, self.model, self.bundle, path, snapshot,
                                                 final=False),
                         lambda path: training_state.save(self.accelerator, self.model, self.optimizer,
                                                          self.scheduler, path),
                         {"step": step, **self.state})

    def save(self) -> None:
        """out/final: the trained model (LoRA merged)."""
        self.accelerator.wait_for_everyone()
        save_model(self.accelerator, self.model, self.bundle, self.out / "final", self._provenance(steps=self.total),
                   final=True)
        self.accelerator.wait_for_everyone()

    def summary(self) -> dict:
        losses = self.state["losses"]
        return {"is_main": self.accelerator.is_main_process, "out": str(self.out), "final": str(self.out / "final"),
                "stage": self.config.stage, "steps": self.total, "precision": self.precision,
                "resumed_from": self.start, "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "tokens": self.state["tokens"],
                "tokens_per_s": round(self.state["tokens"] / max(self.state["seconds"], 1e-9), 1)}

    # -------------------------------------------------------------------------------------------------- cleanup
    @staticmethod
    def cleanup() -> None:
        # the Accelerator is a process-wide singleton; a later train() in this process (stage 2 after stage 1)
        # may need other settings. The process group (PartialState) is kept.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


def train(config: TrainConfig, show_progress: bool = True) -> dict:
    """Runs (or resumes) the training `config` describes; returns a summary. Bad input raises before `out` exists."""
    run = Run(config, show_progress)
    try:
        run.setup()
        run.train()
        run.save()
        return run.summary()
    finally:
        run.cleanup()


def _model_hash(spec: str) -> str | None:
    from vlsafe.model import checkpoint

    try:
        return checkpoint.content_hash(spec) if Path(spec).is_dir() else None
    except VlsafeError:
        return None


def _encode_plain(formatter, record):
    """`template: plain` (a function of the module, not a lambda: DataLoader workers pickle it)."""
    return formatter.encode_plain(record)


def _target_tokens(batch: dict) -> int:
    """Target tokens after the causal shift: what the SFT loss of a micro-batch sums over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
