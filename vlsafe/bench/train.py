"""`vlsafe bench train`: training throughput of vlsafe's engine against a plain `transformers.Trainer`, and how far
each is from the machine's limit.

Both train the same VLM (VLM@0 of the chosen LLM and tower) on the same batches of the built-in corpus (the
engine's length-grouped batch plan, fed to the Trainer in order), in the same precision, with the same learning
rate and step count, one after the other in this process. `--stage full` (stage 2: projector + LM on the
conversations) or `--stage projector` (stage 1: the projector alone on the captions, the LM frozen: its backward
pass computes activation gradients only, so a token costs 4 x the LM's parameters in FLOPs instead of 6 x).
Throughput is input tokens (non-padding) per second over the steps after the first (which pays one-off costs). The
matmul peak (fp32 and bf16) is measured in the same run, and MFU is reported against the bf16 peak (fp32 where the
hardware has no native bf16; see limits.py), beside `matmul_ceiling`: the share of a square matmul's rate that the
LM's own matmuls reach, timed alone at a step's token count, which no implementation passes (SmolLM2-135M's
576-wide layers at about 1000 tokens, bf16, 2 threads of a shared Intel Xeon with AMX: 58% while its square bf16
rate read 2.8 TFLOP/s, 75-85% while it read 0.8).

A shared or throttled machine drifts between the two sides' minutes (one ratio on a 2-core cloud CPU ranged over
1.07-1.28 in single runs of the same tree): `--rounds N` runs the pair N times, the order alternating (vlsafe
first in even rounds, the Trainer first in odd ones), each round from the same VLM@0 and batches. Each side's
figures pool its rounds (tokens over seconds); `ratio` is the pooled ratio, and `rounds` lists each round's own.

    vlsafe bench train --llm smollm2-135m-instruct --tower efficientnet-lite0 --steps 4 --json
    vlsafe bench train --stage projector --steps 12
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from vlsafe.errors import VlsafeError


# stage -> (corpus file, learning rate, FLOPs per token per LM parameter): 2 per matmul product of each parameter
STAGES = {"full": ("stage2_instruct.json", 2e-5, 6), "projector": ("stage1_captions.json", 1e-3, 4)}


def _corpus(root: Path, n: int, seed: int, stage: str) -> Path:
    from vlsafe.data.synthetic import write_corpus

    write_corpus(root / "synth", n=n, seed=seed)
    return root / "synth" / STAGES[stage][0]


def _config(stage: str, model_dir: Path, data: Path, out: Path, steps: int, batch_size: int, lr: float,
            max_length: int, precision: str):
    from vlsafe.train.config import TrainConfig

    return TrainConfig(stage=stage, model=str(model_dir), data=[{"path": str(data)}], out=str(out), lr=lr,
                       batch_size=batch_size, max_steps=steps, warmup_ratio=0.0, max_length=max_length,
                       save_every=0, log_every=1, dtype=precision)


def run_vlsafe(config) -> dict:
    from vlsafe.train.engine import train

    train(config, show_progress=False)
    rows = [json.loads(line) for line in (Path(config.out) / "log.jsonl").read_text().splitlines()][1:]
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "steps_timed": len(rows), "final_loss": rows[-1]["loss"] if rows else None}


def run_trainer(config, out: Path) -> dict:
    """The baseline users would write: HF Trainer over the same encoded records, batches and collator."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from vlsafe.model import checkpoint
    from vlsafe.train import stages
    from vlsafe.train.batches import BatchPlan, record_length
    from vlsafe.train.engine import load_data

    bundle = checkpoint.load(config.model)
    fmt = bundle.formatter(max_length=config.max_length)
    trained = stages.trainable_prefixes(stages.get_stage(config.stage), config)  # what the engine's stage trains
    for name, param in bundle.model.named_parameters():
        param.requires_grad = name.startswith(trained)
    # the frozen tower stays in eval mode, as the engine keeps it: the Trainer's model.train() at every step would
    # put its BatchNorm layers (EfficientNet's) on batch statistics and update their running stats, another function
    tower = bundle.model.vision_tower
    tower.eval()
    tower.train = lambda mode=True: tower
    records, _ = load_data(config, stages.get_stage(config.stage))
    image_tokens = bundle.model.config.num_image_tokens
    plan = BatchPlan(len(records), config.batch_size, 1, 1, config.seed,
                     tuple(record_length(r, image_tokens) for r in records) if config.group_by_length else None)
    # the engine's batches, in its order: the Trainer reads them sequentially
    ordered = [fmt.encode_conversation(records[i]) for step in range(config.max_steps)
               for i in plan.micro_batches(step, 0)[0]]

    class Timer(TrainerCallback):
        """Step ends only: the time between two is a whole step, data loading included, as the engine times it."""

        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    tokens_per_step: list[int] = []

    def collate(batch):
        collated = fmt.collate(batch)
        tokens_per_step.append(int(collated["attention_mask"].sum()))
        return collated

    timer = Timer()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=config.batch_size,
                             max_steps=config.max_steps, learning_rate=config.lr, lr_scheduler_type="cosine",
                             warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=not torch.cuda.is_available(), seed=config.seed, dataloader_num_workers=0,
                             remove_unused_columns=False, disable_tqdm=True, train_sampling_strategy="sequential",
                             bf16=config.dtype == "bf16", fp16=config.dtype == "fp16")
    trainer = Trainer(model=bundle.model, args=args, train_dataset=ordered, data_collator=collate,
                      callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its per-step prints would corrupt `--json` output
    try:
        trainer.train()
    finally:
        from vlsafe.train.engine import Run

        Run.cleanup()  # the Trainer's Accelerator state must not pin the precision of what runs next
    spans = [end - start for start, end in zip(timer.marks, timer.marks[1:])]  # steps 2..n
    tokens = sum(tokens_per_step[1:len(spans) + 1])
    seconds = sum(spans)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "steps_timed": len(spans), "final_loss": losses[-1] if losses else None}


def _pooled(results: list[dict]) -> dict:
    """One side over its rounds: tokens and seconds summed, the last round's final loss."""
    tokens, seconds = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "steps_timed": sum(r["steps_timed"] for r in results), "final_loss": results[-1]["final_loss"]}


def run(llm: str, tower: str, steps: int = 4, batch_size: int = 8, lr: float | None = None, max_length: int = 512,
        n: int = 64, seed: int = 0, dtype: str = "auto", peak_size: int = 2048, rounds: int = 1,
        stage: str = "full") -> dict:
    if stage not in STAGES:
        raise VlsafeError(f"--stage {stage!r}: full (stage 2) or projector (stage 1)")
    if steps < 2:
        raise VlsafeError("--steps must be at least 2 (the first step is not timed)")
    if rounds < 1:
        raise VlsafeError("--rounds must be at least 1")
    from vlsafe import precision as precisions
    from vlsafe.allocator import tune as tune_allocator
    from vlsafe.bench import limits
    from vlsafe.io import machine
    from vlsafe.model import checkpoint

    device = precisions.device_type()
    precision = precisions.resolve(dtype, device)
    allocator = tune_allocator(device)  # before the peak: every side runs with the same heap
    peak = limits.peaks(peak_size, device=device)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="vlsafe-bench-train-") as tmp:
        root = Path(tmp)
        data = _corpus(root, n, seed, stage)
        vlm = checkpoint.build_vlm(llm, tower, seed=seed)
        flops_per_token = STAGES[stage][2] * limits.model_params(vlm.model)
        checkpoint.save(vlm, root / "vlm0")
        results: dict[str, list[dict]] = {"vlsafe": [], "transformers_trainer": []}
        for r in range(rounds):
            config = _config(stage, root / "vlm0", data, root / f"ours-{r}", steps, batch_size,
                             STAGES[stage][1] if lr is None else lr, max_length, precision)
            order = ["vlsafe", "transformers_trainer"][:: 1 if r % 2 == 0 else -1]
            for side in order:
                results[side].append(run_vlsafe(config) if side == "vlsafe"
                                     else run_trainer(config, root / f"trainer-{r}"))
    sides = {side: _pooled(results[side]) for side in results}
    per_round = [{"vlsafe_tokens_per_s": ours["tokens_per_s"], "trainer_tokens_per_s": base["tokens_per_s"],
                  "ratio": round(ours["tokens_per_s"] / base["tokens_per_s"], 3)}
                 for ours, base in zip(results["vlsafe"], results["transformers_trainer"])]
    for side in sides.values():
        side |= {"precision": precision,
                 "mfu": limits.mfu(side["tokens_per_s"], flops_per_token, limits.peak_flops(peak))}
    # the matmuls of a step of the mean size (vlsafe's side: its input tokens per optimizer step)
    step_tokens = max(1, round(sides["vlsafe"]["tokens"] / sides["vlsafe"]["steps_timed"]))
    ceiling = limits.matmul_ceiling(vlm.model, step_tokens, precisions.torch_dtype(precision), STAGES[stage][2] // 2,
                                    peak_size, device=device)
    return {"bench": "train", "stage": stage, "llm": llm, "tower": tower, "steps": steps, "batch_size": batch_size,
            "max_length": max_length, "threads": torch.get_num_threads(), "machine": machine(), "allocator": allocator,
            "precision": precision,
            "peak": peak, "flops_per_token": flops_per_token, "matmul_ceiling": ceiling, **sides,
            "ratio": round(sides["vlsafe"]["tokens_per_s"] / sides["transformers_trainer"]["tokens_per_s"], 3),
            "rounds": per_round}
