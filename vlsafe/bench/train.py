"""`vlsafe bench train`: stage-2 training throughput of vlsafe's engine against a plain `transformers.Trainer`.

Both train the same VLM (VLM@0 of the chosen LLM and tower) on the same encoded stage-2 conversations of the
built-in corpus, with the same global batch, learning rate and step count, one after the other in this process.
Throughput is input tokens (non-padding) per second over the steps after the first (which pays one-off costs).

    vlsafe bench train --llm smollm2-135m-instruct --tower efficientnet-lite0 --steps 4 --json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from vlsafe.errors import VlsafeError


def _corpus(root: Path, n: int, seed: int) -> Path:
    from vlsafe.data.synthetic import write_corpus

    write_corpus(root / "synth", n=n, seed=seed)
    return root / "synth" / "stage2_instruct.json"


def run_vlsafe(model_dir: Path, data: Path, out: Path, steps: int, batch_size: int, lr: float,
               max_length: int) -> dict:
    from vlsafe.train.config import TrainConfig
    from vlsafe.train.engine import train

    config = TrainConfig(stage="full", model=str(model_dir), data=[{"path": str(data)}], out=str(out), lr=lr,
                         batch_size=batch_size, max_steps=steps, warmup_ratio=0.0, max_length=max_length,
                         save_every=0, log_every=1)
    train(config, show_progress=False)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "steps_timed": len(rows), "final_loss": rows[-1]["loss"] if rows else None}


def run_trainer(model_dir: Path, data: Path, out: Path, steps: int, batch_size: int, lr: float,
                max_length: int) -> dict:
    """The baseline users would write: HF Trainer over the same encoded records and collator."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from vlsafe.data.formats import llava
    from vlsafe.model import checkpoint

    bundle = checkpoint.load(model_dir)
    fmt = bundle.formatter(max_length=max_length)
    for name, param in bundle.model.named_parameters():  # stage 2 trains projector + LM, as the engine does
        param.requires_grad = not name.startswith("vision_tower.")
    encoded = [fmt.encode_conversation(c) for c in llava.load(data)]

    class Timer(TrainerCallback):
        """Step ends only: the time between two is a whole step, data loading included, as the engine times it."""

        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    tokens_per_step: list[int] = []

    def collate(batch):
        out = fmt.collate(batch)
        tokens_per_step.append(int(out["attention_mask"].sum()))
        return out

    timer = Timer()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=bundle.model, args=args, train_dataset=encoded, data_collator=collate,
                      callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its per-step prints would corrupt `--json` output
    trainer.train()
    spans = [end - start for start, end in zip(timer.marks, timer.marks[1:])]  # steps 2..n
    tokens = sum(tokens_per_step[1:len(spans) + 1])
    seconds = sum(spans)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "steps_timed": len(spans), "final_loss": losses[-1] if losses else None}


def run(llm: str, tower: str, steps: int = 4, batch_size: int = 8, lr: float = 2e-5, max_length: int = 512,
        n: int = 64, seed: int = 0) -> dict:
    if steps < 2:
        raise VlsafeError("--steps must be at least 2 (the first step is not timed)")
    from vlsafe.model import checkpoint

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="vlsafe-bench-train-") as tmp:
        root = Path(tmp)
        data = _corpus(root, n, seed)
        checkpoint.save(checkpoint.build_vlm(llm, tower, seed=seed), root / "vlm0")
        ours = run_vlsafe(root / "vlm0", data, root / "ours", steps, batch_size, lr, max_length)
        baseline = run_trainer(root / "vlm0", data, root / "trainer", steps, batch_size, lr, max_length)
    return {"bench": "train", "llm": llm, "tower": tower, "steps": steps, "batch_size": batch_size,
            "max_length": max_length, "threads": torch.get_num_threads(), "vlsafe": ours,
            "transformers_trainer": baseline,
            "ratio_tokens_per_s": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 3)}
