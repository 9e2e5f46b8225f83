"""The run directory, its checkpoints and its logs.

    out/config.yaml            the resolved TrainConfig + provenance (data sha256, model hash, versions, processes)
    out/log.jsonl              one line per logged step: step, epoch, loss, lr, grad_norm, tokens, tokens_per_s
    out/tb/                    the same as TensorBoard events
    out/checkpoints/step-N/    an HF-style model dir (`vlsafe eval --model` reads it: the safety-dynamics curve),
                               + training_state/ (trained weights, optimizer, scheduler, RNG of each process:
                                 safetensors + JSON, never a pickle; see state.py)
                               + trainer_state.json (written last)
    out/final/                 the trained model, LoRA merged into plain weights

A checkpoint is written under checkpoints/.step-N.partial and renamed to step-N only when every part is there, so
a kill at any moment leaves either a complete step-N or a .partial that a resume deletes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml

from vlsafe.errors import VlsafeError

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def latest_checkpoint(out: Path) -> tuple[int, Path] | None:
    """The complete checkpoint with the highest step, or None."""
    found = []
    for path in (out / "checkpoints").glob("step-*"):
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def _opening_leftover(path: Path) -> bool:
    """What a run killed while opening its directory leaves before config.yaml: an empty checkpoints/ and the
    config's temporary file (the engine's `_open_run_dir`); such a folder starts afresh."""
    if path.name == "checkpoints" and path.is_dir():
        return not any(path.iterdir())
    return path.name == ".config.yaml.tmp" and path.is_file()


def resume_point(out: Path, resolved: dict, data_hashes: list[str]) -> tuple[int, Path | None] | None:
    """None for a fresh run; (step, checkpoint or None) to continue an interrupted run of the same config.

    Reads only: a bad `out` (a different config, other data, a finished run, a foreign directory) raises
    before anything is written.
    """
    if not out.exists():
        return None
    if out.is_file():
        raise VlsafeError(f"{out}: output path is a file")
    if not (out / "config.yaml").is_file():
        if any(not _opening_leftover(path) for path in out.iterdir()):
            raise VlsafeError(f"{out}: output path exists and is not a vlsafe training run (choose a new one)")
        return None
    if (out / "final").exists():
        raise VlsafeError(f"{out}: this run is complete ({out / 'final'}); choose a new out to train again")
    saved = yaml.safe_load((out / "config.yaml").read_text()) or {}
    saved_hashes = [d.get("sha256") for d in saved.get("provenance", {}).get("data", [])]
    saved.pop("provenance", None)
    if saved != resolved:
        differ = sorted(k for k in set(saved) | set(resolved) if saved.get(k) != resolved.get(k))
        raise VlsafeError(f"{out}: holds an interrupted run of a different config (differs in: "
                          f"{', '.join(differ)}); resume it with its own config.yaml or choose a new out")
    if saved_hashes != data_hashes:
        raise VlsafeError(f"{out}: the training data changed since this run started (sha256 differs); "
                          "resuming would not reproduce the run")
    found = latest_checkpoint(out)
    return found if found else (0, None)


def write_checkpoint(accelerator, out: Path, step: int, save_model: Callable[[Path], None],
                     save_state: Callable[[Path], None], state: dict) -> Path:
    """Every process calls this; the main one writes the model, each one its part of the training state.

    `state` (step, tokens, losses) goes into trainer_state.json, written last: its presence marks completeness.
    """
    checkpoints = out / "checkpoints"
    tmp = checkpoints / f".step-{step}.partial"
    final = checkpoints / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoints.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    save_model(tmp)  # on every process: gathering FSDP / ZeRO-3 shards needs them all; the main one writes
    accelerator.wait_for_everyone()
    save_training_state(save_state, tmp / "training_state")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():  # only after an earlier crash between rename and log; the new one is as good
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def save_training_state(save_state: Callable[[Path], None], path: Path) -> None:
    # a seam of its own so the tests can interrupt a checkpoint half-written
    save_state(path)


def clean_partials(out: Path) -> None:
    for path in (out / "checkpoints").glob(".step-*.partial"):
        shutil.rmtree(path, ignore_errors=True)


class RunLog:
    """log.jsonl and TensorBoard on the main process; a resumed run drops what came after its checkpoint."""

    def __init__(self, out: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.writer = None
        if not enabled:
            return
        if start_step == 0:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events a resumed run writes again
        self.writer = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
