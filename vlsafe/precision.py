"""Which floating-point precision a run computes in, for training and evaluation alike.

    fp32   everything in float32
    bf16   training: mixed precision (bf16 autocast, fp32 master weights and optimizer state);
           evaluation: the weights cast to bfloat16, bf16 matmuls and KV cache, while the residual stream,
           the final norm and the top logits stay fp32 (vlsafe/eval/generate.py `set_precision`)
    fp16   training on CUDA GPUs only (mixed, with loss scaling); never on a CPU
    auto   bf16 where the hardware runs it natively, fp32 elsewhere

The rule for `auto`: on a CUDA GPU, bf16 if `torch.cuda.is_bf16_supported()`; on a CPU, bf16 if its flags (Linux
`/proc/cpuinfo`) list `avx512_bf16` or `amx_bf16` (x86) or `bf16` (aarch64), since without those instructions
torch emulates bf16 and runs slower than fp32. Asking for bf16 on a CPU without them, or for fp16 on a CPU, is
an error (one line, exit 2), never a silent slowdown.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from vlsafe.errors import VlsafeError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 instructions (flags of /proc/cpuinfo; False where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def device_type(on_cpu: bool = False) -> str:
    """'cuda' where a CUDA GPU will run the model, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() and not on_cpu else "cpu"


def resolve(name: str, device: str = "cpu") -> str:
    """`name` (auto | fp32 | bf16 | fp16) made concrete for `device` ('cpu' or 'cuda'); raises when it cannot run."""
    if name not in PRECISIONS:
        raise VlsafeError(f"unknown dtype {name!r} (known: {', '.join(PRECISIONS)})")
    bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_bf16()
    if name == "auto":
        return "bf16" if bf16 else "fp32"
    if name == "bf16" and not bf16:
        where = "this GPU" if device == "cuda" else "this CPU (no avx512_bf16 / amx_bf16 / bf16 flag)"
        raise VlsafeError(f"dtype bf16: {where} has no native bf16, it would run slower than fp32; "
                          "use dtype fp32 (or auto)")
    if name == "fp16" and device != "cuda":
        raise VlsafeError("dtype fp16 runs on CUDA GPUs only; on a CPU use bf16 (or auto, or fp32)")
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a concrete precision (fp32 | bf16 | fp16)."""
    return _TORCH[name]
