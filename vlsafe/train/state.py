"""Training state without pickle: what a resume needs, as safetensors for tensors and JSON for the rest.

    training_state/weights.safetensors     the trained parameters (and the model's buffers) as they stand
    training_state/optimizer.safetensors   every tensor of the optimizer state, keyed `state/<param>/<name>`
    training_state/optimizer.json          the rest of it: param groups (lr, betas, ...) and non-tensor state
    training_state/scheduler.json          the learning-rate scheduler's state dict
    training_state/rng-<rank>.json         python and numpy generator states of each process
    training_state/rng-<rank>.safetensors  torch's CPU (and CUDA) generator states of each process

Why not accelerate's `save_state`: it writes `optimizer.bin`, `scheduler.bin` and `random_states_*.pkl`, and
loading them runs the unpickler. Here nothing is ever unpickled. Sharded training (FSDP, DeepSpeed) keeps
accelerate's format, since its optimizer state lives in shards only accelerate knows how to gather.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy
import torch
from safetensors.torch import load_file, save_file

from vlsafe.errors import VlsafeError
from vlsafe.io import write_json


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save(accelerator, model, optimizer, scheduler, path: Path) -> None:
    """Every process calls this; the main one writes weights, optimizer and scheduler, each one its RNG."""
    if is_sharded(accelerator):
        accelerator.save_state(str(path))
        return
    path.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_file(_trained_tensors(accelerator.unwrap_model(model)), str(path / "weights.safetensors"))
        tensors, rest = _split(optimizer.state_dict())
        save_file(tensors, str(path / "optimizer.safetensors"))
        write_json(path / "optimizer.json", rest)
        write_json(path / "scheduler.json", _jsonable(scheduler.state_dict(), "scheduler state"))
    rank = accelerator.process_index
    python_state = random.getstate()
    name, keys, position, has_gauss, cached = numpy.random.get_state()
    write_json(path / f"rng-{rank}.json", {"python": [python_state[0], list(python_state[1]), python_state[2]],
                                           "numpy": [name, keys.tolist(), position, has_gauss, cached]})
    generators = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        generators |= {f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(generators, str(path / f"rng-{rank}.safetensors"))


def load(accelerator, model, optimizer, scheduler, path: Path) -> None:
    """Restores what `save` wrote, on every process."""
    if is_sharded(accelerator):
        accelerator.load_state(str(path))
        return
    rank = accelerator.process_index
    needed = ["weights.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
              f"rng-{rank}.json", f"rng-{rank}.safetensors"]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise VlsafeError(f"{path}: training state incomplete (missing {', '.join(missing)}); delete this "
                          "checkpoint to resume from an earlier one")
    weights = load_file(str(path / "weights.safetensors"))
    unexpected = accelerator.unwrap_model(model).load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise VlsafeError(f"{path / 'weights.safetensors'}: tensors the model does not have ({unexpected[0]}, ...)")
    optimizer.load_state_dict(_join(load_file(str(path / "optimizer.safetensors")),
                                    json.loads((path / "optimizer.json").read_text())))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = json.loads((path / f"rng-{rank}.json").read_text())
    version, keys, gauss = rng["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, position, has_gauss, cached = rng["numpy"]
    numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), position, has_gauss, cached))
    generators = load_file(str(path / f"rng-{rank}.safetensors"))
    torch.set_rng_state(generators["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([generators[f"cuda_{i}"] for i in range(torch.cuda.device_count())
                                      if f"cuda_{i}" in generators])


def _trained_tensors(model) -> dict[str, torch.Tensor]:
    """Trained parameters and persistent buffers (a BatchNorm's running statistics move in training mode);
    frozen parameters are the starting model's, which the resumed run loads anyway."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()
            if name in trained or name in buffers}


def _split(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, per_param = {}, {}
    for index, values in state["state"].items():
        per_param[str(index)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{key}"] = value.detach().contiguous().clone()
            else:
                per_param[str(index)][key] = value
    return tensors, _jsonable({"state": per_param, "param_groups": state["param_groups"]}, "optimizer state")


def _join(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state = {int(index): dict(values) for index, values in rest["state"].items()}
    for key, tensor in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = tensor
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _jsonable(obj, what: str):
    try:
        return json.loads(json.dumps(obj))
    except TypeError as err:
        raise VlsafeError(f"{what} holds a value JSON cannot store ({err})") from None
