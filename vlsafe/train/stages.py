"""Training stages: each is its data, its trainable parameters and its loss, run by the one engine (engine.py).

    align      text LLM     every LM weight (or LoRA on the LM)          SFT loss on assistant turns
    projector  VLM          projector only (LLaVA stage 1)               SFT loss on assistant turns
    full       VLM          projector + LM (+ tower if unfreeze_tower);  SFT loss on assistant turns
                            the LM in full or by LoRA (LLaVA stage 2),
                            text-only data mixed in at `text_ratio`
    safety-sft VLM          as `full`, on safety data (VLGuard format or    SFT loss on assistant turns
                            vlsafe's jsonl), post hoc on an adapted VLM
    mixed      VLM          as `full`, on stage-2 data with safety data     SFT loss on assistant turns
                            mixed in at `mix_ratio`
    dpo        VLM or LLM   as `full` (the LM alone for a text LLM)         TRL's DPO loss on preference pairs,
                                                                            reference log-probs precomputed
                                                                            once (and kept for a resume)

A stage may also say which records it reads, how it selects them from the data files (mixing), how it encodes
and collates them, what counts as one item of the loss (target tokens; pairs for DPO), and what it computes once
before step 1 (DPO's reference log-probs). The defaults are those of supervised fine-tuning.

"Trainable" is decided by parameter-name prefix on the model vlsafe saves (`projector.`, `language_model.`,
`vision_tower.`), so what a stage may change is visible here and checked per tensor by the tests.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from vlsafe.data.records import Conversation, PreferencePair
from vlsafe.errors import VlsafeError
from vlsafe.model.chat import IGNORE_INDEX
from vlsafe.train.config import TrainConfig


@dataclass(frozen=True)
class Stage:
    name: str
    needs_vlm: bool | None  # True: a vlsafe VLM directory; False: a text-only LLM; None: either
    trainable: tuple[str, ...]  # parameter-name prefixes trained in full ("" = everything)
    lora_allowed: bool
    loss: Callable  # (run, batch, num_items) -> scalar loss (the sum over this batch / num_items), or
    #                 (loss, {metric: value}) for metrics the log should carry; run.model is the model to call
    record_type: type = Conversation  # the record class its data files must hold
    select: Callable | None = None  # (config, [records of each data file], [DataSpec]) -> (records, info)
    encode: Callable | None = None  # (formatter, record) -> encoded item; default: encode_conversation
    collate: Callable | None = None  # (formatter, [items]) -> batch dict; default: formatter.collate(right)
    count: Callable | None = None  # (batch) -> loss items in it; default: target tokens after the shift
    setup: Callable | None = None  # (run, records) -> (records, context for the loss: run.context)


def sft_loss(run, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy over the assistant-only labels the chat formatter set, as the model's own loss.

    `num_items` is the number of target tokens in the whole optimizer step (every micro-batch on every process):
    the loss is a sum over this micro-batch divided by it, so each target token weighs the same however the
    global batch is split into micro-batches and processes (a mean per micro-batch would weigh a token of a short
    answer more than one of a long answer, and change with grad_accum).
    """
    return label_only_loss(run.model, batch, num_items)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next token is a target in some row: the only ones that need logits (images, prompts and
    padding need none, and the LM head over a 49K vocabulary costs as much as several layers)."""
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    # never empty: a micro-batch without targets still runs the graph (DDP expects every step to), loss 0
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=labels.device)


def head_logits(model, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    """Logits at positions `keep` only, through transformers' `logits_to_keep` where the (language) model takes
    it, else sliced from the full head (an LLM whose remote code predates it)."""
    if takes_logits_to_keep(model):
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[:, keep]


def takes_logits_to_keep(model) -> bool:
    inner = plain_model(getattr(model, "module", model))  # DDP's wrapper, then PEFT's
    inner = getattr(inner, "language_model", inner)  # a VLM passes it on to its LM
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def label_only_loss(model, batch: dict, num_items: torch.Tensor) -> torch.Tensor:
    """The sum of the shifted cross-entropy over target tokens / num_items, with the LM head applied only where a
    target is: the loss (and gradient) of the full head, without its cost where no label is.

    `label_positions` is one set of positions for the whole batch (what `logits_to_keep` takes), so rows of other
    lengths bring positions of their own that are padding or prompt in the rest (2.3x the targets on stage-2
    batches of 8); a pre-hook on the LM head then hands it only the (row, position) pairs that hold a target. The
    hook runs inside the model's forward, so a sharded (FSDP) head is gathered as usual."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = label_positions(batch["labels"])
    targets = batch["labels"][:, 1:][:, keep]
    head = _output_embeddings(model) if takes_logits_to_keep(model) else None
    if head is None:
        logits = head_logits(model, {**inputs, "use_cache": False}, keep)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum") / num_items
    kept = targets != IGNORE_INDEX
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][kept],) + tuple(args[1:]))
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits  # (targets, vocabulary)
    finally:
        handle.remove()
    return torch.nn.functional.cross_entropy(logits.float(), targets[kept], reduction="sum") / num_items


def _output_embeddings(model):
    """The LM head module inside DDP's and PEFT's wrappers (and a VLM), or None."""
    inner = plain_model(getattr(model, "module", model))
    getter = getattr(inner, "get_output_embeddings", None)
    head = getter() if getter else None
    return head if isinstance(head, torch.nn.Module) else None


def _stages() -> dict[str, Stage]:
    from vlsafe.train import dpo, safety_data

    vlm_full = ("projector.", "language_model.")
    return {
        "align": Stage("align", needs_vlm=False, trainable=("",), lora_allowed=True, loss=sft_loss,
                       select=safety_data.select_checked),
        "projector": Stage("projector", needs_vlm=True, trainable=("projector.",), lora_allowed=False, loss=sft_loss),
        "full": Stage("full", needs_vlm=True, trainable=vlm_full, lora_allowed=True, loss=sft_loss,
                      select=safety_data.select_task),
        "safety-sft": Stage("safety-sft", needs_vlm=True, trainable=vlm_full, lora_allowed=True, loss=sft_loss,
                            select=safety_data.select_checked),
        "mixed": Stage("mixed", needs_vlm=True, trainable=vlm_full, lora_allowed=True, loss=sft_loss,
                       select=safety_data.select_mixed),
        # "" trains a text LLM whole; on a VLM, `trainable_prefixes` narrows it to the projector and the LM
        "dpo": Stage("dpo", needs_vlm=None, trainable=vlm_full, lora_allowed=True, loss=dpo.loss,
                     record_type=PreferencePair, encode=dpo.encode, collate=dpo.collate, count=dpo.count_pairs,
                     setup=dpo.setup),
    }


STAGES: dict[str, Stage] = {}


def get_stage(name: str) -> Stage:
    if not STAGES:
        STAGES.update(_stages())  # built on first use: the dpo module imports TRL lazily, not at import time
    if name not in STAGES:
        raise VlsafeError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")
    return STAGES[name]


def check_model(stage: Stage, bundle, where: str) -> None:
    if stage.needs_vlm is None:
        return
    if stage.needs_vlm and not bundle.is_vlm:
        raise VlsafeError(f"{where}: stage {stage.name!r} needs a vlsafe VLM directory (`vlsafe build`), "
                          "got a text-only LLM")
    if not stage.needs_vlm and bundle.is_vlm:
        raise VlsafeError(f"{where}: stage {stage.name!r} trains a text-only LLM, got a VLM directory")


def trainable_prefixes(stage: Stage, config: TrainConfig, is_vlm: bool = True) -> tuple[str, ...]:
    # a stage that takes either kind of model (dpo) trains a text LLM whole
    prefixes = stage.trainable if is_vlm or stage.needs_vlm is not None else ("",)
    prefixes = prefixes + (("vision_tower.",) if config.unfreeze_tower else ())
    if config.lora is not None:
        # under LoRA the LM's own weights stay frozen: only the adapters (and the non-LM prefixes) train
        prefixes = tuple(p for p in prefixes if p not in ("", "language_model."))
    return prefixes


def prepare_model(model: torch.nn.Module, stage: Stage, config: TrainConfig) -> torch.nn.Module:
    """Freezes what the stage does not train and adds LoRA adapters; returns the model to train.

    With LoRA the result is a `peft.PeftModel` around the VLM (or LLM); `plain_model` gets the plain model back.
    """
    from vlsafe.model.vlm import VisionLanguageModel

    is_vlm = isinstance(model, VisionLanguageModel)
    if config.lora is not None:
        if not stage.lora_allowed:
            raise VlsafeError(f"stage {stage.name!r} does not take LoRA")
        model = _add_lora(model, config, is_vlm=is_vlm)
    prefixes = trainable_prefixes(stage, config, is_vlm)
    for name, param in plain_named_parameters(model):
        param.requires_grad_(name.startswith(prefixes) or (config.lora is not None and "lora_" in name))
    # a frozen module computes the function it will be evaluated with: no dropout noise in what is not trained
    model.train()
    for prefix in ("vision_tower", "language_model", "projector"):
        module = getattr(plain_model(model), prefix, None)
        if module is not None and not any(p.requires_grad for p in module.parameters()):
            module.eval()
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not any(p.requires_grad for p in model.parameters()):
        raise VlsafeError(f"stage {stage.name!r}: nothing to train in this model")
    return model


# the longest `max_length` at which CPU training switches to eager attention: eager keeps each layer's L x L attention
# weights for the backward (at 1024 tokens, batch 8 and 9 heads, 300 MB a layer in fp32); measured up to 300 tokens
EAGER_MAX_LENGTH = 1024


def training_attention(model: torch.nn.Module, device_type: str, max_length: int | None = None) -> str | None:
    """Sets the language model's attention for training on `device_type` and returns the one it now uses.

    On a CPU, eager attention (two matmuls and a softmax) instead of PyTorch's flash-attention kernel: its CPU
    backward is slow at the lengths these stages train on. Measured on 2 cores of an Intel Xeon with AMX, SmolLM2-135M
    forward + backward in bf16 at batch 8: 110 tokens 1.44-1.80 s a step against 2.33-2.87, 300 tokens 3.80 against
    4.39-4.82; in fp32 the same time and the same gradients. In a stage-1 step the flash backward was 24% of the time.
    The choice lives in the in-memory config only (`config.json` does not carry it), so saved checkpoints load as
    before; GPUs, and runs longer than EAGER_MAX_LENGTH, keep their implementation."""
    inner = plain_model(model)
    language_model = getattr(inner, "language_model", inner)  # a VLM trains its LM's attention
    config = getattr(language_model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    short = max_length is not None and max_length <= EAGER_MAX_LENGTH
    if device_type == "cpu" and short and current == "sdpa" and hasattr(language_model, "set_attn_implementation"):
        language_model.set_attn_implementation("eager")
        return "eager"
    return current


def cache_frozen_casts(model: torch.nn.Module, precision: str, device_type: str) -> int:
    """Frozen linear layers keep a bf16 copy of their weight for bf16 mixed precision on a CPU; returns how many.

    Autocast caches the bf16 cast of a weight only while it trains (a leaf that requires grad): a frozen weight (the
    LM in stage 1, LoRA's base layers) is cast again at every forward. The copy is the same cast made once (remade if
    the weight is written), so the loss and the gradients are those of plain autocast, bit for bit (test). Measured
    on the default profile's stage 1 on 2 cores of an Intel Xeon with AMX: 1.157 against 1.199 s a step. Only on a
    CPU: on a GPU the cast is cheap and the copy would cost memory a 7B model's LoRA run does not have."""
    from vlsafe.model.linear import swap_linear_forwards

    if precision != "bf16" or device_type != "cpu":
        return 0
    return swap_linear_forwards(plain_model(model), _linear_cast_once, where=lambda m: not m.weight.requires_grad)


def _linear_cast_once(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if weight.dtype == torch.float32 and torch.is_autocast_enabled("cpu") and x.device.type == "cpu" \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        stamp = (weight.data_ptr(), weight._version)
        cached = vars(module).get("_vlsafe_bf16")
        if cached is None or cached[0] != stamp:
            cached = (stamp, weight.detach().to(torch.bfloat16))
            vars(module)["_vlsafe_bf16"] = cached
        weight = cached[1]  # autocast casts the input (and the bias) to bf16 as before
    return torch.nn.functional.linear(x, weight, module.bias)


def _add_lora(model, config: TrainConfig, is_vlm: bool):
    from peft import LoraConfig, get_peft_model

    names = "|".join(re.escape(m) for m in config.lora.target_modules)
    scope = r"language_model\..*" if is_vlm else r".*"
    # a regex, so that on a VLM only the LM's layers get adapters, never the tower's or the projector's
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=rf"^{scope}\.({names})$" if is_vlm else rf"^{scope}({names})$", bias="none")
    # peft reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning in every LoRA stage's log
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    if not any("lora_" in n for n, _ in peft_model.named_parameters()):
        raise VlsafeError(f"lora.target_modules {config.lora.target_modules} match no layer of the model")
    return peft_model


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def plain_model(model) -> torch.nn.Module:
    """The VLM / LLM inside a PeftModel (with adapter layers still in it), or the model itself."""
    return model.get_base_model() if is_lora(model) else model


def plain_named_parameters(model):
    """Parameter names as saved checkpoints spell them, with LoRA's `.base_layer` wrapper removed."""
    for name, param in plain_model(model).named_parameters():
        yield name.replace(".base_layer.", "."), param


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """Plain weights of a LoRA-wrapped model, W + scale * B @ A per adapted layer, without touching the model.

    Intermediate checkpoints need the merged weights while training goes on with the adapters; merging in place
    and unmerging would leave W + d - d, which is not W in floating point, and break exact resumption. The sum is
    the same operation PEFT's own merge does (`base_layer.weight.data += delta`), so the last checkpoint equals
    the final model made by `merge_and_unload` bit for bit (tested).
    """
    from peft.tuners.lora import LoraLayer

    base = plain_model(model)
    state = {}
    for name, tensor in base.state_dict().items():
        if "lora_" not in name:
            state[name.replace(".base_layer.", ".")] = tensor.detach()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                key = f"{name}.weight"
                state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    return state


def describe_trainable(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trained, "total_params": total}
