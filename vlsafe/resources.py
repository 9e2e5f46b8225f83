"""Will it fit? Memory of a training run estimated from the config before any weight is loaded.

A 7B full fine-tune on a 24 GB machine would otherwise be OOM-killed after the model loaded (or hours later, at
the first long batch). The estimate counts parameters exactly by building the model from its config.json on the
meta device (no memory, no weights), then adds, per process:

    weights      4 bytes / parameter (fp32 master weights; bf16 is mixed precision: autocast copies on top, +2)
    gradients    4 bytes / trainable parameter
    AdamW        8 bytes / trainable parameter (exp_avg, exp_avg_sq)
    activations  per layer and token about 34 x hidden bytes at 16-bit (Korthikanti et al. 2022), x2 in fp32;
                 with gradient checkpointing only each layer's input is kept, plus one layer's full activations
    logits       micro-batch x length x vocab in fp32, twice (the logits and their gradient)

Sharded runs (FSDP, DeepSpeed ZeRO-3: weights, gradients and optimizer split over processes) divide the first
three by the number of processes. It is an estimate: the message gives it so a user can judge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vlsafe.errors import VlsafeError

GB = 1024**3
# fraction of the available memory a run may plan to use: allocator fragmentation, the data loader, the tokenizer
HEADROOM = 0.9


@dataclass
class Estimate:
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GB:.1f}"
                          for name in ("weights", "gradients", "optimizer", "activations"))
        return (f"{self.total / GB:.1f} GiB ({parts}; {self.parameters / 1e9:.2f}B parameters, "
                f"{self.trainable / 1e9:.2f}B trainable)")


def _meta_model(model_dir: Path):
    """The model of a checkpoint directory, built from its config.json on the meta device: shapes, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import vlsafe.model  # noqa: F401  (registers the VLM config with the Auto classes)

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VlsafeError(f"{model_dir / 'config.json'}: cannot read the model config "
                          f"({str(err).splitlines()[0][:160]})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _text_shape(model) -> tuple[int, int, int]:
    """(hidden size, layers, vocab) of the language model inside a VLM or of a plain LLM."""
    config = getattr(model.config, "text_config", None) or model.config
    return config.hidden_size, config.num_hidden_layers, config.vocab_size


def _trainable(model, prefixes: tuple[str, ...], lora: dict | None) -> int:
    if lora is None:
        return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))
    import torch

    targets = set(lora.get("target_modules") or ())
    count = sum(p.numel() for name, p in model.named_parameters() if name.startswith("projector."))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets and "vision" not in name:
            count += lora["r"] * (module.in_features + module.out_features)
    return count


def estimate_training(config, processes: int | None = None, sharded: bool | None = None) -> Estimate | None:
    """The estimate for a `TrainConfig`, or None when the model is not a local directory with a config.json
    (pico, a preset prepared on first use, a hub id): nothing to estimate from before loading."""
    model_dir = Path(config.model)
    if not (model_dir / "config.json").is_file():
        return None
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    if sharded is None:
        sharded = (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
                   or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3")
    model = _meta_model(model_dir)
    is_vlm = hasattr(model.config, "text_config") and hasattr(model, "projector")
    if not is_vlm:
        prefixes = ("",)
    elif config.stage == "projector":
        prefixes = ("projector.",)
    else:
        prefixes = ("projector.", "language_model.") + (("vision_tower.",) if config.unfreeze_tower else ())
    lora = config.lora.model_dump() if config.lora is not None else None
    parameters = sum(p.numel() for p in model.parameters())
    trainable = _trainable(model, prefixes, lora)
    share = processes if sharded else 1
    weights = parameters * (6 if config.dtype == "bf16" else 4) // share
    gradients = 4 * trainable // share
    optimizer = 8 * trainable // share
    hidden, layers, vocab = _text_shape(model)
    micro = max(1, config.batch_size // (config.grad_accum * processes))
    if config.stage == "dpo":
        micro *= 2  # chosen and rejected go through the model together
    tokens = micro * config.max_length
    scale = 1 if config.dtype == "bf16" else 2  # the 34 x hidden rule counts 16-bit activations
    per_layer = 34 * hidden * tokens * scale
    kept = 2 * hidden * tokens * scale * layers + per_layer if config.gradient_checkpointing else per_layer * layers
    activations = kept + 2 * 4 * tokens * vocab
    return Estimate(parameters, trainable, weights, gradients, optimizer, activations)


def available_memory() -> tuple[int, str]:
    """(bytes, where): free memory of the first accelerator if there is one, else the RAM this process may use
    (MemAvailable, capped by a cgroup limit such as a container's)."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"GPU {torch.cuda.get_device_name()}"
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            available = min(available, int(text))
    return available, "CPU RAM"


def check_training_fits(config, available: int | None = None, where: str | None = None) -> Estimate | None:
    """Raises VlsafeError with the estimate when the run cannot fit; returns the estimate (or None) otherwise.
    `VLSAFE_SKIP_MEMORY_CHECK=1` skips it for users who know better (offloading, swap)."""
    if os.environ.get("VLSAFE_SKIP_MEMORY_CHECK") == "1":
        return None
    estimate = estimate_training(config)
    if estimate is None:
        return None
    if available is None:
        available, where = available_memory()
    if estimate.total > HEADROOM * available:
        raise VlsafeError(f"{config.model}: training needs about {estimate.describe()}, but {where or 'this machine'} "
                          f"has {available / GB:.1f} GiB available; use LoRA, gradient checkpointing, a smaller "
                          "batch or more processes with FSDP/ZeRO-3 (VLSAFE_SKIP_MEMORY_CHECK=1 to try anyway)")
    return estimate

