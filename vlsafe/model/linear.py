"""A loaded model's plain `nn.Linear` layers computed by another function, in place: how vlsafe changes the
arithmetic of linear layers without another model class (rows-last products in fp32 decoding,
vlsafe/eval/generate.py; bf16 copies of frozen weights in CPU training, vlsafe/train/stages.py)."""

from __future__ import annotations

import functools
from typing import Callable

import torch


def swap_linear_forwards(model: torch.nn.Module, forward: Callable, on: bool = True,
                         where: Callable[[torch.nn.Linear], bool] | None = None) -> int:
    """Sets `forward(module, x)` as the forward of each plain `nn.Linear` in `model` that still has its class's
    forward (and for which `where(module)` holds); `on=False` restores the layers set to this `forward`. Returns
    how many layers changed. A subclass (LoRA, quantised) computes its own way and is left alone, as is a forward
    set by another library (accelerate's hooks)."""
    count = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        mine = getattr(vars(module).get("forward"), "func", None) is forward
        if on and "forward" not in vars(module) and (where is None or where(module)):
            module.forward = functools.partial(forward, module)
            count += 1
        elif not on and mine:
            del module.forward
            count += 1
    return count
