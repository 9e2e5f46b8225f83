"""Stage `dpo`: TRL's DPO loss inside the vlsafe engine, on a VLM (pairs with or without images) or a text LLM.

Why not `trl.DPOTrainer` itself: it is a second training loop (transformers' Trainer), while every vlsafe stage
runs through the one engine (same batching, resumption, checkpoints, accelerate launch), and its data path
tokenizes images with an HF processor whose placeholder expansion our VLM does not share. TRL 1.16 has no
standalone DPO loss function either: the loss lives in `DPOTrainer._compute_loss`. So the engine calls TRL's
own `DPOTrainer.compute_loss` on `TrlDpo`, an object carrying exactly the attributes `DPOTrainer.__init__` sets
from a `trl.DPOConfig` (beta, loss types and weights, f-divergence, label smoothing), with the reference
log-probs precomputed (TRL's `precompute_ref_log_probs` path). Every loss TRL implements (sigmoid, ipo, hinge,
robust, ...) and its metrics (rewards/margins, rewards/accuracies) are TRL's, not a copy.

TRL calls `model(..., labels=, fused_lm_head=True)` and reads per-token `log_probs` (and entropy, mean logits,
top-1 hits for its metrics): `FusedView` answers that call from the model's logits with TRL's own
`selective_log_softmax` / `entropy_from_logits`. Our VLM cannot take TRL's `add_fused_lm_head` patch (it needs a
backbone returning hidden states, `base_model`, which the VLM does not expose). Logits are materialised at the
answer positions only (`logits_to_keep`), so memory grows with batch x answer length x vocabulary: use small
micro-batches (grad_accum) at scale.

Reference: the starting weights. Their log-probs are computed once in `setup`, before step 1, with the same
function (and precision) the policy uses, so no second model is held in memory (LoRA or full fine-tuning alike).
They are written to `out/reference_logps.json`, and a resumed run reads them back instead of recomputing.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from vlsafe.data.records import Conversation, PreferencePair, Turn
from vlsafe.errors import VlsafeError
from vlsafe.model.chat import IGNORE_INDEX


@dataclass
class EncodedPair:
    chosen: object  # chat.Encoded
    rejected: object
    ref: tuple[float, float] | None


def _conversation(pair: PreferencePair, answer: str) -> Conversation:
    return Conversation(id=pair.id, image=pair.image,
                        turns=[Turn(role="user", content=pair.prompt), Turn(role="assistant", content=answer)])


def encode(formatter, pair: PreferencePair) -> EncodedPair:
    chosen = formatter.encode_conversation(_conversation(pair, pair.chosen))
    rejected = formatter.encode_conversation(_conversation(pair, pair.rejected))
    for name, enc in (("chosen", chosen), ("rejected", rejected)):
        if all(label == IGNORE_INDEX for label in enc.labels[1:]):
            raise VlsafeError(f"pair {pair.id!r}: max_length {formatter.max_length} leaves no {name} token to score")
    ref = pair.meta.get("ref_logps")
    return EncodedPair(chosen, rejected, tuple(ref) if ref is not None else None)


def collate(formatter, pairs: list[EncodedPair]) -> dict:
    """TRL's layout: chosen rows then rejected rows, `completion_mask` over the answer tokens."""
    batch = formatter.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], "right")
    batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
    if all(p.ref is not None for p in pairs):
        batch["ref_chosen_logps"] = torch.tensor([p.ref[0] for p in pairs], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([p.ref[1] for p in pairs], dtype=torch.float32)
    return batch


def count_pairs(batch: dict) -> int:
    return batch["input_ids"].shape[0] // 2


class FusedView:
    """A callable answering TRL's `model(..., labels, fused_lm_head=True)` with per-token statistics."""

    def __init__(self, model):
        self.model = model

    def __call__(self, labels=None, fused_lm_head=True, **inputs):
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        from vlsafe.train.stages import head_logits, label_positions

        inputs["use_cache"] = False
        # logits at the answer positions only; TRL reads (rows, length - 1) tensors, zero where no label is
        keep = label_positions(labels)
        logits = head_logits(self.model, inputs, keep).float()
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        kept_mask, safe = mask[:, keep], targets[:, keep].clamp(min=0)

        def spread(values: torch.Tensor) -> torch.Tensor:
            full = values.new_zeros(targets.shape)
            full[:, keep] = values
            return full

        log_probs = spread(selective_log_softmax(logits, safe) * kept_mask)
        with torch.no_grad():  # metrics only
            entropy = spread(entropy_from_logits(logits.detach()) * kept_mask)
            mean_logits = spread(logits.detach().mean(-1) * kept_mask)
            is_top1 = spread((logits.detach().argmax(-1) == safe) & kept_mask)
        return SimpleNamespace(log_probs=log_probs, entropy=entropy, mean_logits=mean_logits, is_top1=is_top1,
                               log_sum_sq_probs=None, aux_loss=None, label_mask=mask)


class TrlDpo:
    """What `trl.DPOTrainer.compute_loss` reads of its trainer, set as `DPOTrainer.__init__` sets it."""

    def __init__(self, spec, accelerator, model):
        import dataclasses

        from trl import DPOConfig, DPOTrainer

        # DPOConfig's defaults, read from its dataclass fields: instantiating it (a TrainingArguments) would
        # reset accelerate's process-wide state, the process group included, under the running engine
        fields = {f.name: f.default for f in dataclasses.fields(DPOConfig)
                  if f.default is not dataclasses.MISSING}
        args = SimpleNamespace(**{**fields, "beta": spec.beta, "loss_type": list(spec.loss_type),
                                  "loss_weights": spec.loss_weights, "label_smoothing": spec.label_smoothing,
                                  "f_divergence_type": spec.f_divergence_type, "gradient_checkpointing_kwargs": None})
        self.args, self.accelerator, self.model, self.ref_model = args, accelerator, model, None
        self.beta = args.beta
        self.precompute_ref_logps = True
        self.loss_types = args.loss_type
        self.loss_weights = args.loss_weights or [1.0] * len(self.loss_types)
        self.ld_alpha = args.ld_alpha
        self.f_divergence_type = args.f_divergence_type
        self.f_alpha_divergence_coef = args.f_alpha_divergence_coef
        self.label_smoothing = args.label_smoothing
        self.use_weighting = args.use_weighting
        self.aux_loss_enabled = False
        # compute_loss calls self._compute_loss: TRL's own method, bound to this object
        self._compute_loss = functools.partial(DPOTrainer._compute_loss, self)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._tp_size = 1

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        from trl import DPOTrainer

        self.model = model
        self._metrics["train"].clear()
        loss = DPOTrainer.compute_loss(self, FusedView(model), batch)
        metrics = {k: float(v[-1]) for k, v in self._metrics["train"].items()
                   if k.startswith(("rewards/", "logps/"))}
        return loss, metrics


def loss(run, batch: dict, num_items: torch.Tensor):
    """TRL's mean loss over this micro-batch's pairs, reweighted to a share of the whole step's pairs."""
    value, metrics = run.context.loss(run.model, batch)
    return value * count_pairs(batch) / num_items, metrics


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of the chosen and rejected rows: the quantity TRL's DPO compares."""
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                           "ref_rejected_logps")}
    labels = inputs["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    logps = FusedView(model)(labels=labels, **inputs).log_probs.sum(dim=1)
    return logps.chunk(2, dim=0)


def reference_logps(model, formatter, pairs: list[PreferencePair], batch_size: int, device) -> list[tuple]:
    """(chosen, rejected) log-probs of every pair under `model` as it is now, dropout off, no gradients."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                batch = collate(formatter, [encode(formatter, p) for p in pairs[start:start + batch_size]])
                chosen, rejected = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
                out += list(zip(chosen.tolist(), rejected.tolist()))
    finally:
        for module, mode in modes.items():
            module.train(mode)
    return out


REFERENCE_FILE = "reference_logps.json"


def setup(run, pairs: list[PreferencePair]) -> tuple[list, TrlDpo]:
    """Puts the reference log-probs (the starting model's) into each pair's meta; returns TRL's loss object.

    Computed once, on the first start, and written to the run directory; a resumed run (same config and data:
    `resume_point` checked that) reads them back. Every process computes all pairs, so no gather is needed.
    """
    import json

    from vlsafe.io import write_json
    from vlsafe.train.config import DpoSpec

    accelerator, path = run.accelerator, run.out / REFERENCE_FILE
    ids = [p.id for p in pairs]
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("precision") == run.precision and saved.get("ids") == ids:
        refs = saved["logps"]
    else:
        refs = reference_logps(run.model, run.formatter, pairs, max(run.plan.micro_batch, 1), accelerator.device)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(path, {"precision": run.precision, "ids": ids, "logps": [list(r) for r in refs]})
        accelerator.wait_for_everyone()
    pairs = [p.model_copy(update={"meta": {**p.meta, "ref_logps": list(ref)}}) for p, ref in zip(pairs, refs)]
    return pairs, TrlDpo(run.config.dpo or DpoSpec(), accelerator, run.model)


def preference_stats(bundle, pairs: list[PreferencePair], max_length: int = 2048, batch_size: int = 8) -> dict:
    """How often a model gives the chosen answer a higher log-probability than the rejected one."""
    refs = reference_logps(bundle.model, bundle.formatter(max_length), pairs, batch_size, bundle.model.device)
    margins = [c - r for c, r in refs]
    return {"n": len(margins), "chosen_preferred": sum(m > 0 for m in margins) / max(len(margins), 1),
            "mean_logp_margin": sum(margins) / max(len(margins), 1)}
