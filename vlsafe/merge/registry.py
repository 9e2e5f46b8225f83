"""What each merge method takes: its parameters (per model or shared), their defaults and ranges, and how resolved
values reach the pure functions in `methods`. The config validates against this; the engine calls `apply`.

Parameter names and defaults are mergekit's, so a mergekit YAML means the same here. `int8_mask` is accepted and
ignored: it only saved memory in mergekit's sign mask, which changes no number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from vlsafe.merge import methods


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float or bool
    default: Any = None  # None: required
    check: Optional[Callable[[float], bool]] = None
    expected: str = ""  # the allowed range, for the error message

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Method:
    name: str
    per_model: tuple[Param, ...]
    shared: tuple[Param, ...]
    needs_base: bool
    # (base, non-base inputs, per-input values, shared values, generator) -> merged tensor
    apply: Callable[..., torch.Tensor]
    max_inputs: Optional[int] = None  # non-base inputs
    seeded: bool = False  # draws random numbers: the engine hands it a generator seeded per tensor

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.per_model + self.shared if p.name == name), None)


def _unit_density(value: float) -> bool:
    return 0 < value <= 1


DENSITY = Param("density", float, 1.0, _unit_density, "in (0, 1]")
GAMMA = Param("gamma", float, 0.01, lambda v: 0 <= v < 1, "in [0, 1)")
WEIGHT = Param("weight", float)
LAMBDA = Param("lambda", float, 1.0)
INT8_MASK = Param("int8_mask", bool, False)


def _values(per_input: list[dict], name: str) -> list[float]:
    return [values[name] for values in per_input]


def _task_vector_method(name: str, normalize: bool, rescale: bool, sparsity: Optional[str]) -> Method:
    """mergekit's "generalized task arithmetic" family: the same parameters, differing defaults, one function."""
    per_model = (WEIGHT,) + ((DENSITY,) if sparsity else ()) + ((GAMMA,) if sparsity == "outliers" else ())
    shared = (Param("normalize", bool, normalize), Param("rescale", bool, rescale), LAMBDA, INT8_MASK)
    function = getattr(methods, name)

    def apply(base, tensors, per_input, shared_values, generator):
        kwargs = {"lam": shared_values["lambda"], "normalize": shared_values["normalize"]}
        if sparsity is not None:
            kwargs.update(densities=_values(per_input, "density"), rescale=shared_values["rescale"])
        if sparsity == "random":
            kwargs["generator"] = generator
        if sparsity == "outliers":
            kwargs["gammas"] = _values(per_input, "gamma")
        return function(base, tensors, _values(per_input, "weight"), **kwargs)

    return Method(name, per_model, shared, needs_base=True, apply=apply, seeded=sparsity == "random")


def _apply_linear(base, tensors, per_input, shared_values, generator):
    return methods.linear(tensors, _values(per_input, "weight"), shared_values["normalize"])


def _apply_slerp(base, tensors, per_input, shared_values, generator):
    return methods.slerp(base, tensors[0], shared_values["t"])


METHODS: dict[str, Method] = {m.name: m for m in (
    # linear averages all listed models (the base too, when it is listed); weights are mixture proportions
    Method("linear", (Param("weight", float, None, lambda v: v >= 0, ">= 0"),), (Param("normalize", bool, True),),
           needs_base=False, apply=_apply_linear),
    # `rescale` exists for task_arithmetic too, as in mergekit, where it does nothing without sparsification
    _task_vector_method("task_arithmetic", normalize=False, rescale=False, sparsity=None),
    _task_vector_method("ties", normalize=True, rescale=False, sparsity="magnitude"),
    _task_vector_method("dare_linear", normalize=False, rescale=True, sparsity="random"),
    _task_vector_method("dare_ties", normalize=False, rescale=True, sparsity="random"),
    _task_vector_method("breadcrumbs", normalize=False, rescale=False, sparsity="outliers"),
    _task_vector_method("breadcrumbs_ties", normalize=False, rescale=False, sparsity="outliers"),
    Method("slerp", (), (Param("t", float, None, lambda v: 0 <= v <= 1, "in [0, 1]"),), needs_base=True,
           apply=_apply_slerp, max_inputs=1),
)}
