"""Merge methods as pure functions over tensors: no files, no names, no configs.

Each function takes the tensors of one weight (same shape) and its coefficients, and returns the merged tensor in
the dtype of its first input. The arithmetic runs in float32 (float64 when the inputs are float64) whatever the
storage dtype, so bfloat16 checkpoints do not lose precision mid-merge.

The semantics follow mergekit's (0.1.x) so its YAML configs mean the same thing here:
- `linear`: sum(w_i x_i) / sum(w_i) (without the division when normalize is off).
- task-vector methods (`task_arithmetic`, `ties`, `dare_*`, `breadcrumbs*`): deltas d_i = x_i - base are sparsified
  (each with its own density), weighted, optionally sign-elected (TIES "sum" consensus), summed, divided by the sum
  of the weights that took part when normalize is on, scaled by lambda and added to the base.
- `rescale` matches the L1 norm of each sparsified delta to the delta before sparsification (mergekit's choice,
  not DARE's 1/density: the two agree in expectation).
- `slerp`: spherical interpolation between the flattened base and the other tensor; t=0 gives the base. Nearly
  collinear pairs fall back to linear interpolation.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

Tensor = torch.Tensor
Sparsifier = Callable[[Tensor, int], Tensor]  # (delta, input index) -> sparsified delta


def _work_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _check_same_shape(tensors: Sequence[Tensor]) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"tensors to merge have different shapes: {sorted(shapes)}")


# ------------------------------------------------------------------------------------------------ sparsification


def _match_l1(original: Tensor, masked: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale `masked` so its L1 norm equals the original's; near-zero norms are left alone (nothing to match)."""
    before, after = original.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude_prune(delta: Tensor, density: float, rescale: bool = False) -> Tensor:
    """Keeps the `density` fraction of entries with the largest magnitude (at least one), zeroes the rest."""
    if density >= 1:
        return delta
    count = delta.numel()
    if count == 0:
        return delta.clone()
    keep = max(1, int(density * count))
    magnitude = delta.abs().reshape(-1)
    # select the keep-th largest magnitude (O(n)) instead of sorting everything: ~5x faster on embeddings
    threshold = magnitude.kthvalue(count - keep + 1).values
    mask = magnitude > threshold
    short = keep - int(mask.sum())
    tied = magnitude == threshold
    if int(tied.sum()) == short:
        mask |= tied
    else:
        # more magnitudes tie at the threshold than places left (frequent in bf16, occasional in large float32
        # tensors): which ones survive is arbitrary, so take mergekit's arbitrary choice (its argsort) to agree
        mask = torch.zeros_like(mask)
        mask[torch.argsort(magnitude, descending=True)[:keep]] = True
    masked = torch.where(mask.reshape(delta.shape), delta, 0.0)
    return _match_l1(delta, masked) if rescale else masked


def magnitude_outlier_prune(delta: Tensor, density: float, gamma: float, rescale: bool = False) -> Tensor:
    """Model Breadcrumbs: drops the `gamma` fraction of largest entries (outliers) and then the smallest, keeping
    `density`. When both cannot hold, density wins and fewer outliers are dropped."""
    if density >= 1:
        return delta
    count = delta.numel()
    keep = int(density * count)
    top = int(gamma * count)
    bottom = max(0, count - keep - top)
    flat = delta.reshape(-1)
    order = torch.sort(flat.abs(), descending=False).indices
    mask = torch.zeros_like(flat)
    mask[order[bottom:bottom + keep]] = 1
    masked = (flat * mask).reshape(delta.shape)
    return _match_l1(delta, masked) if rescale else masked


def random_prune(delta: Tensor, density: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: keeps each entry with probability `density`, drawn from `generator` so a seed reproduces the merge."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    masked = delta * keep.to(delta.dtype)
    return _match_l1(delta, masked) if rescale else masked


# ------------------------------------------------------------------------------------------------ the methods


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Weighted average (normalize) or weighted sum of the inputs."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear needs one weight per tensor and at least one tensor")
    _check_same_shape(tensors)
    dtype = _work_dtype(tensors[0])
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor.to(dtype), alpha=float(weight))
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise ValueError("linear with normalize needs weights that do not sum to zero")
        out.div_(total)
    return out.to(tensors[0].dtype)


def task_vector_merge(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float],
                      sparsify: Optional[Sparsifier] = None, sign_consensus: bool = False,
                      normalize: bool = False, lam: float = 1.0) -> Tensor:
    """The shared core of the task-vector family (mergekit's "generalized task arithmetic").

    Deltas are accumulated one at a time rather than stacked, so the work memory is a few tensors, not a few
    tensors per input (the sign election alone needs every weighted delta at once).
    """
    if len(tensors) != len(weights):
        raise ValueError("task-vector merges need one weight per non-base tensor")
    if not tensors:
        return base.clone()
    _check_same_shape([base, *tensors])
    dtype = _work_dtype(base)
    base_w = base.to(dtype)

    def weighted_delta(i: int) -> Tensor:
        delta = tensors[i].to(dtype) - base_w  # a fresh tensor, safe to scale in place
        if sparsify is not None:
            delta = sparsify(delta, i)
        return delta.mul_(float(weights[i]))

    if sign_consensus:
        deltas = [weighted_delta(i) for i in range(len(tensors))]
        # TIES sign election: the sign of the summed weighted deltas wins (a zero sum counts as positive); an
        # entry keeps only the deltas that agree with it, and a zero delta agrees with neither sign
        total = deltas[0].clone()
        for delta in deltas[1:]:
            total.add_(delta)
        positive = total >= 0
        del total
        mixed = torch.zeros_like(base_w)
        divisor = torch.zeros_like(base_w)
        for delta, weight in zip(deltas, weights):
            agree = torch.where(positive, delta > 0, delta < 0)
            mixed.add_(torch.where(agree, delta, 0.0))
            divisor.add_(agree.to(dtype), alpha=float(weight))
        del deltas
        divisor[divisor == 0] = 1
    else:
        mixed = weighted_delta(0)
        for i in range(1, len(tensors)):
            mixed.add_(weighted_delta(i))
        total = float(sum(float(w) for w in weights))
        divisor = total if abs(total) >= 1e-8 else 1.0
    if normalize:
        mixed.div_(divisor)
    return mixed.mul_(lam).add_(base_w).to(base.dtype)


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], lam: float = 1.0,
                    normalize: bool = False) -> Tensor:
    return task_vector_merge(base, tensors, weights, normalize=normalize, lam=lam)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
         lam: float = 1.0, normalize: bool = True, rescale: bool = False) -> Tensor:
    def prune(delta: Tensor, i: int) -> Tensor:
        return magnitude_prune(delta, densities[i], rescale)
    return task_vector_merge(base, tensors, weights, prune, sign_consensus=True, normalize=normalize, lam=lam)


def dare_linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                generator: torch.Generator, lam: float = 1.0, normalize: bool = False,
                rescale: bool = True) -> Tensor:
    def prune(delta: Tensor, i: int) -> Tensor:
        return random_prune(delta, densities[i], generator, rescale)
    return task_vector_merge(base, tensors, weights, prune, sign_consensus=False, normalize=normalize, lam=lam)


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
              generator: torch.Generator, lam: float = 1.0, normalize: bool = False,
              rescale: bool = True) -> Tensor:
    def prune(delta: Tensor, i: int) -> Tensor:
        return random_prune(delta, densities[i], generator, rescale)
    return task_vector_merge(base, tensors, weights, prune, sign_consensus=True, normalize=normalize, lam=lam)


def breadcrumbs(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                gammas: Sequence[float], lam: float = 1.0, normalize: bool = False, rescale: bool = False,
                sign_consensus: bool = False) -> Tensor:
    def prune(delta: Tensor, i: int) -> Tensor:
        return magnitude_outlier_prune(delta, densities[i], gammas[i], rescale)
    return task_vector_merge(base, tensors, weights, prune, sign_consensus=sign_consensus, normalize=normalize,
                             lam=lam)


def breadcrumbs_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                     gammas: Sequence[float], lam: float = 1.0, normalize: bool = False,
                     rescale: bool = False) -> Tensor:
    return breadcrumbs(base, tensors, weights, densities, gammas, lam, normalize, rescale, sign_consensus=True)


def slerp(base: Tensor, other: Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of the whole (flattened) tensor; the angle comes from the normalised vectors, the
    interpolation applies to the raw ones, so norms blend as in mergekit."""
    _check_same_shape([base, other])
    dtype = _work_dtype(base)
    a, b = base.reshape(-1).to(dtype), other.reshape(-1).to(dtype)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > eps else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > eps else torch.ones_like(norm_b)
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        out = (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * b
    return out.reshape(base.shape).to(base.dtype)
