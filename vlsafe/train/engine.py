"""The one training loop, used by every stage: `train(config)` / `vlsafe train CONFIG.yaml [key=value ...]`.

Read top to bottom: set up (stage, data, model, accelerator, run directory), train (accumulate, clip, step,
log, checkpoint), save the final model. It runs unchanged as one CPU process, as several (gloo) and on GPUs under
DDP / FSDP / DeepSpeed, started by `accelerate launch --config_file configs/accelerate/<kind>.yaml -m vlsafe.cli
train CONFIG.yaml`. Everything that decides the numbers is a function of the config and the step, so a resumed
run continues exactly where the interrupted one stood (tested to 1e-6, in practice bit for bit).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from vlsafe.errors import VlsafeError
from vlsafe.model.chat import IGNORE_INDEX
from vlsafe.train import stages
from vlsafe.train.batches import BatchPlan, EncodedRecords, micro_batch_loader
from vlsafe.train.checkpoints import RunLog, clean_partials, resume_point, write_checkpoint
from vlsafe.train.config import TrainConfig


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
        if loaded and type(loaded[0]).__name__ != stage.record_type:
            raise VlsafeError(f"{path}: format {spec.format!r} holds {type(loaded[0]).__name__} records; stage "
                              f"{stage.name!r} trains on {stage.record_type} records")
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
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # several processes on a machine without GPUs: accelerate picks gloo only when told it is on CPU, and
    # `accelerate launch --cpu` starts a single process unless mpirun is configured, so the processes come from
    # the multi-GPU (torchrun) launcher (configs/accelerate/cpu_2proc.yaml) and the CPU is chosen here
    on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    # the scheduler is stepped by hand once per optimizer step: accelerate's default would step it once per
    # process per step, which assumes a per-process batch size (ours is global)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum,
                              mixed_precision="bf16" if config.dtype == "bf16" else "no",
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
    return accelerator


def make_optimizer(model, config: TrainConfig, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    # the usual split: no weight decay on biases and norm weights (1-d tensors)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.adam_betas)
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


# -------------------------------------------------------------------------------------------------------- train
def train(config: TrainConfig, show_progress: bool = True) -> dict:
    """Runs (or resumes) the training `config` describes; returns a summary. Bad input raises before `out` exists."""
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    from vlsafe.io import versions
    from vlsafe.model import checkpoint

    stage = stages.get_stage(config.stage)
    records, data_info = load_data(config, stage)
    bundle = checkpoint.load(config.model)
    stages.check_model(stage, bundle, config.model)
    out = Path(config.out)
    try:
        accelerator = make_accelerator(config, lambda world: config.batch_size // (config.grad_accum * world))
        plan = BatchPlan(len(records), config.batch_size, config.grad_accum, accelerator.num_processes, config.seed)
        total = plan.total_steps(config.epochs, config.max_steps)
        if total < 1:
            raise VlsafeError(f"{len(records)} records make no full batch of {config.batch_size}")
        resume = resume_point(out, config.resolved(), [d["sha256"] for d in data_info])
        set_seed(config.seed)  # LoRA's initialisation and dropout draw from it
        model = stages.prepare_model(bundle.model, stage, config)
        optimizer, scheduler, warmup = make_optimizer(model, config, total)
        provenance = {"data": data_info, "model": {"spec": config.model, "content_sha256": _model_hash(config.model)},
                      "processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
                      "micro_batch": plan.micro_batch, "steps": total, "warmup_steps": warmup,
                      "steps_per_epoch": plan.steps_per_epoch, **stages.describe_trainable(model),
                      "versions": versions()}
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        if stage.setup is not None:
            # before any state is restored: on a resumed run too, what setup computes (DPO's reference
            # log-probs) comes from the starting weights, which is what the reference is
            records = stage.setup(accelerator, model, records, bundle.formatter(config.max_length), config,
                                  plan.micro_batch)
        start, state = _start(accelerator, out, config, provenance, resume)
        summary = _loop(accelerator, model, optimizer, scheduler, stage, config, plan, bundle, records, out,
                        start, total, state, provenance, show_progress)
    finally:
        # the Accelerator is a process-wide singleton; a later train() in this process (stage 2 after stage 1)
        # may need other settings. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
        GradientState._reset_state()
    return summary


def _model_hash(spec: str) -> str | None:
    from vlsafe.model import checkpoint

    try:
        return checkpoint.content_hash(spec) if Path(spec).is_dir() else None
    except VlsafeError:
        return None


def _start(accelerator, out: Path, config: TrainConfig, provenance: dict, resume) -> tuple[int, dict]:
    """Creates the run directory, or restores the training state of the last complete checkpoint."""
    import json

    from vlsafe.config import dump_config

    accelerator.wait_for_everyone()  # every process has checked `out` before the main one creates it
    if accelerator.is_main_process:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        clean_partials(out)
        if resume is None or resume[1] is None:
            tmp = out / ".config.yaml.tmp"
            tmp.write_text(dump_config(config.model_copy(update={"provenance": provenance})))
            tmp.replace(out / "config.yaml")
    accelerator.wait_for_everyone()
    if resume is None or resume[1] is None:
        return 0, {"tokens": 0, "seconds": 0.0, "losses": []}
    step, path = resume
    accelerator.load_state(str(path / "training_state"))
    state = json.loads((path / "trainer_state.json").read_text())
    if accelerator.is_main_process:
        print(f"resuming {out} from step {step} ({path})", file=sys.stderr)
    return step, state


def _loop(accelerator, model, optimizer, scheduler, stage, config, plan, bundle, records, out, start, total,
          state, provenance, show_progress) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    formatter = bundle.formatter(config.max_length)
    loader = micro_batch_loader(EncodedRecords(records, formatter, stage.encode, stage.collate), plan,
                                accelerator.process_index, start, total, config.num_workers)
    count = stage.count or _target_tokens
    batches = iter(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    log = RunLog(out, start, accelerator.is_main_process)
    bar = Progress(TextColumn(f"[bold]{stage.name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=Console(stderr=True),
                   disable=not (show_progress and accelerator.is_main_process))
    task = bar.add_task("train", total=total, completed=start, info="")
    # no model.train() here: prepare_model left the frozen parts in eval mode (no dropout) on purpose
    losses: list[float] = state["losses"]
    with bar:
        for step in range(start, total):
            began = time.perf_counter()
            micro = [next(batches) for _ in range(config.grad_accum)]
            # target tokens (after the causal shift) and input tokens of the whole step, over all processes
            counts = torch.tensor([sum(count(b) for b in micro), sum(int(b["attention_mask"].sum()) for b in micro)],
                                  device=accelerator.device)
            counts = accelerator.reduce(counts, reduction="sum")
            num_items = counts[0].clamp(min=1)
            lr = scheduler.get_last_lr()[0]
            step_loss = torch.zeros((), device=accelerator.device)
            metrics: dict[str, float] = {}
            grad_norm = None
            for batch in micro:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    loss = stage.loss(model, batch, num_items)
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
                            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            step_loss = float(accelerator.reduce(step_loss, reduction="sum"))
            if metrics:  # the mean over processes
                values = accelerator.reduce(torch.tensor(list(metrics.values()), device=accelerator.device), "mean")
                metrics = {k: round(float(v), 6) for k, v in zip(metrics, values)}
            seconds = time.perf_counter() - began
            state["tokens"] += int(counts[1])
            state["seconds"] += seconds
            losses.append(step_loss)
            done = step + 1
            if done % config.log_every == 0 or done == total:
                log.write({"step": done, "epoch": round(plan.epoch_of(done), 4), "loss": step_loss, "lr": lr,
                           "grad_norm": float(grad_norm) if grad_norm is not None else None,
                           "tokens": int(counts[1]), "target_tokens": int(counts[0]),
                           "tokens_per_s": round(int(counts[1]) / seconds, 1), **metrics})
            bar.update(task, completed=done, info=f"loss {step_loss:.4f}  lr {lr:.2e}")
            if config.save_every and done % config.save_every == 0:
                _checkpoint(accelerator, model, bundle, out, done, config, provenance, state)
    log.close()
    accelerator.wait_for_everyone()
    final_provenance = {"command": "train", "stage": config.stage, "config": config.resolved(), "steps": total,
                        "parent": provenance["model"], "data": provenance["data"]}
    save_model(accelerator, model, bundle, out / "final", final_provenance, final=True)
    accelerator.wait_for_everyone()
    return {"is_main": accelerator.is_main_process, "out": str(out), "final": str(out / "final"),
            "stage": config.stage, "steps": total,
            "resumed_from": start, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "tokens": state["tokens"],
            "tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1)}


def _target_tokens(batch: dict) -> int:
    """Target tokens after the causal shift: what the SFT loss of a micro-batch sums over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _checkpoint(accelerator, model, bundle, out, step, config, provenance, state) -> None:
    snapshot = {"command": "train", "stage": config.stage, "config": config.resolved(), "step": step,
                "parent": provenance["model"], "data": provenance["data"]}
    write_checkpoint(accelerator, out, step,
                     lambda path: save_model(accelerator, model, bundle, path, snapshot, final=False),
                     {"step": step, **state})
