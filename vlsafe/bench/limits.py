"""The machine's limit, measured in the same run as the benchmark it judges: matmul peak and model FLOPs.

MFU (model FLOP utilisation) = tokens/s x model FLOPs per token / the measured bf16 matmul peak (the fp32 peak on
hardware without native bf16, whose fastest precision that is: `peak_flops`), the convention of the PaLM paper:
model FLOPs are what the model mathematically needs, whatever the implementation skips or redoes, so MFU compares
implementations fairly. FLOPs per token count the language model's matrices (every parameter
but the input embedding table, the LM head included) and leave out attention's own T^2 term and the vision
tower: at the lengths benchmarked here that understates the work by a few percent, so MFU is a lower bound.

    training      6 x N per input token (forward 2N, backward 4N)
    generation    2 x N per new token (the prompt pass is not counted: a lower bound again)
"""

from __future__ import annotations

import time

import torch


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0, device: str = "cpu") -> float:
    """FLOP/s of (m, k) x (k, n) matmuls in `dtype`, the best of repeated timings over about `seconds`."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # first call: allocation and kernel choice
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds or best == float("inf"):
        started = time.perf_counter()
        a @ b
        sync()
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * m * k * n / best


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0, device: str = "cpu") -> float:
    """FLOP/s of square `size` matmuls in `dtype`."""
    return matmul_rate(size, size, size, dtype, seconds, device)


def linear_shapes(model) -> dict[tuple[int, int], int]:
    """{(in_features, out_features): how many}: the language model's linear layers, the LM head included."""
    language_model = getattr(model, "language_model", model)
    shapes: dict[tuple[int, int], int] = {}
    for module in language_model.modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def matmul_ceiling(model, tokens: int, dtype: torch.dtype, products: int, size: int = 2048, seconds: float = 0.2,
                   device: str = "cpu") -> dict:
    """What the model's own matmuls reach on this machine: each linear layer's products for `tokens` rows, timed
    alone and FLOP-weighted (`flops`), and as a share of square `size` matmuls' rate (`share`): MFU cannot pass
    it even with all the work between the matmuls free, since narrow layers (a 576-wide LM) run below a square
    matmul's rate. `products` per layer: 1 forward; 2 adds the activation gradient (a frozen layer's backward); 3
    adds the weight gradient. Each product is timed beside a square matmul, so a host whose speed drifts (a shared
    cloud CPU's bf16 rate moved 0.8-2.1 TFLOP/s between readings seconds apart) moves both alike."""
    flops = spent = square_spent = 0.0
    for (k, n), count in linear_shapes(model).items():
        for m, inner, cols in [(tokens, k, n), (tokens, n, k), (k, tokens, n)][:products]:
            work = 2 * m * inner * cols * count
            flops += work
            spent += work / matmul_rate(m, inner, cols, dtype, seconds, device)
            square_spent += work / matmul_rate(size, size, size, dtype, seconds, device)
    return {"tokens": tokens, "flops": round(flops / spent), "share": round(square_spent / spent, 4)}


def peaks(size: int = 2048, seconds: float = 1.0, device: str = "cpu") -> dict:
    """{"fp32_flops", "bf16_flops", "mfu_against"}: measured now, on this machine, with its current threads.

    bf16 is timed only where the hardware runs it natively: a CPU without avx512_bf16 / amx_bf16 emulates it at a
    few hundredths of its fp32 speed (0.14 against 46 GFLOP/s on an AVX2 EPYC: one 2048 matmul takes two minutes),
    no vlsafe run uses it there (`vlsafe.precision.resolve` refuses), and fp32 is that machine's limit; there
    `bf16_flops` is None and MFU is taken against the fp32 peak (`mfu_against`)."""
    from vlsafe import precision

    native = precision.resolve("auto", device) == "bf16"
    return {"matmul_size": size, "fp32_flops": round(matmul_peak(torch.float32, size, seconds, device)),
            "bf16_flops": round(matmul_peak(torch.bfloat16, size, seconds, device)) if native else None,
            "mfu_against": "bf16" if native else "fp32"}


def peak_flops(peak: dict) -> float:
    """The peak MFU divides by: bf16 where the hardware has it natively, fp32 elsewhere (`peaks`)."""
    return peak[f"{peak['mfu_against']}_flops"]


def describe(peak: dict) -> str:
    """"peak 134 GFLOP/s fp32, 419 bf16" or "peak 46 GFLOP/s fp32 (no native bf16: MFU against fp32)"."""
    fp32 = f"peak {peak['fp32_flops'] / 1e9:.0f} GFLOP/s fp32"
    if peak["bf16_flops"] is None:
        return f"{fp32} (no native bf16: MFU against fp32)"
    return f"{fp32}, {peak['bf16_flops'] / 1e9:.0f} bf16"


def model_params(model) -> int:
    """Parameters a token's computation passes through in the language model: all but the input embeddings
    (the LM head counts, tied or not); a VLM's tower and projector are left out."""
    language_model = getattr(model, "language_model", model)
    embedding = language_model.get_input_embeddings().weight
    head = language_model.get_output_embeddings()
    total = sum(p.numel() for p in language_model.parameters()) - embedding.numel()
    if head is not None and head.weight is embedding:  # tied: the head's matrix is still a matmul per token
        total += embedding.numel()
    return total


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return round(tokens_per_s * flops_per_token / peak_flops, 4)
