"""Which floating-point precision a run computes in, for training and evaluation alike.

    fp32   everything in float32
    bf16   training: mixed precision (bf16 autocast, fp32 master weights and optimizer state);
           evaluation, when asked: the weights cast to bfloat16, bf16 matmuls and KV cache, while the residual
           stream, the final norm and the top logits stay fp32 (vlsafe/eval/generate.py `set_precision`)
    fp16   training on CUDA GPUs only (mixed, with loss scaling); never on a CPU
    auto   bf16 where the hardware runs it natively, fp32 elsewhere

Evaluation generates in fp32 unless asked otherwise (`vlsafe eval --dtype`, a study's `eval.dtype`), because greedy
answers are the measurement: on the default study's adapted VLM (SmolLM2-135M + EfficientNet-Lite0, its 520-item
suite), fp32 at batch 32 and at batch 8 wrote the same 520 answers, while bf16 wrote other words for 204 of them and
changed the default judge's verdict on 42 of 360 safety items (88% agreement) and whether 8 of 160 answers to
questions with a known answer were right. fp32 is not batch-independent either, only far less moved: its rounding
follows the batch's shape, so a near-tie can fall the other way. The base SmolLM2-135M-Instruct's 301 align-data
answers (64 new tokens) at batch 16 and at batch 64 differ in one, a few words in, while batch 16 on one machine
gave the 294 answers the align data keeps exactly as the default study's earlier run at batch 16 did on another.
What fp32 evaluation costs, measured on 2 threads of an Intel Xeon with AMX (amx_bf16, avx512_fp16): prefill, most of
an evaluation's time, runs SmolLM2-135M's linear layers at 200-270 GFLOP/s in fp32 against a 2048 x 2048 matmul's
~320, so fp32 evaluation is near that machine's fp32 limit; the rest is bf16's (AMX: 2-7x on these shapes). Ways to
keep fp32-like answers at bf16 speed were timed on decoding's shapes ([64, 576] x [576, 1536]) and do not pay:
torch has no CPU bf16 x bf16 -> fp32 matmul, so a split (hi + lo) product goes through oneDNN's fp32 path with bf16
math (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`): its three products took 0.99 ms against fp32's 0.57
(error 1e-5 against 1e-6; bf16 7e-3); fp16 matmuls (error 9e-4) ran slower than fp32 in the same run: 4.2 against
1.4 ms at 64 rows, 14.4 against 13.0 at 1024.
The limit is in the weights themselves: every bf16 product rounds its operands to bf16, and the default study's
adapted VLM with only its weights rounded to bf16, evaluated in fp32 on its 520 items (batch 64), wrote other words
for 184 answers and changed 32 verdicts (default judge, or right / wrong where an answer is known): 93.8%
agreement, where fp32 at batch 32 and at batch 64 agree on all 520. No evaluation with bf16 weights reaches 97% on
this model; the rest of bf16's disagreement (88-90% in all) comes from rounding the activations.
Training stays in bf16 where the hardware runs it natively: what it computes is a loss, not an argmax.

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
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of this CPU from /proc/cpuinfo; (None, no flags) where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, frozenset()
    name, flags = None, set()
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model") and name is None:
            name = value or None
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return name, frozenset(flags)


def cpu_bf16_flags() -> list[str]:
    """The CPU's flags that mean native bf16 instructions (x86 avx512_bf16 / amx_bf16, aarch64 bf16)."""
    return sorted(cpu_info()[1] & set(_CPU_BF16_FLAGS))


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 instructions (False where /proc/cpuinfo cannot be read)."""
    return bool(cpu_bf16_flags())


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


# ------------------------------------------------------------------------------------------------ bf16 generation
def _fp32_residual(model) -> list:
    """Hooks that keep a bf16 model's residual stream in fp32, as autocast would, without casting weights per step.

    The embeddings' output becomes fp32, so every `hidden + sublayer(hidden)` adds in fp32; each norm (computed in
    fp32 inside) hands bf16 to the linear layers after it, and rotary cos/sin follow the weights so that queries,
    keys and the KV cache stay bf16. Why: in whole-model bf16 the residual is rounded to 8 bits after every layer,
    and that drift, more than the matmuls, is what moves the logits away from fp32 (SmolLM2-135M, one prompt: max
    logit error 0.92, against 0.28 with this) and lets padding or batch shape change a greedy answer.
    Returns [] where the model does not run this way (a probe forward fails)."""
    dtype = next(model.parameters()).dtype
    embeddings = model.get_input_embeddings()
    handles = [embeddings.register_forward_hook(lambda module, args, output: output.float())]
    final = _final_norm(model)  # the final norm's output stays fp32: `mixed_bf16` takes it
    for module in model.modules():
        name = type(module).__name__.lower()
        batchnorm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)  # a vision tower's, bf16 already
        if "norm" in name and module is not final and not batchnorm:
            # a norm's output feeds the next linear layers: bf16 there, one cast per norm rather than per linear
            handles.append(module.register_forward_hook(lambda module, args, output: output.to(dtype)))
        elif "rotary" in name:
            handles.append(module.register_forward_hook(
                lambda module, args, output: tuple(t.to(dtype) for t in output) if isinstance(output, tuple)
                else output))
    try:
        with torch.inference_mode():
            works = bool(torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all())
    except (RuntimeError, TypeError, ValueError):
        works = False
    if not works:  # an architecture these hooks do not fit: whole-model bf16 it is
        for handle in handles:
            handle.remove()
        return []
    return handles


EXACT_CANDIDATES = 8


def mixed_bf16(model, on: bool) -> None:
    """Hooks that make a bf16 model generate in mixed precision (`on=False` removes them): the residual stream in
    fp32 (`_fp32_residual`), and the logits of the best EXACT_CANDIDATES tokens of each position recomputed in
    fp32 from the final norm's fp32 output.

    Why: bf16 logits near 20-30 are rounded to steps of 0.125, so close candidates tie or swap on rounding alone,
    and padding or batch shape (batched vs one prompt at a time) decides which wins. Refining only the top
    candidates costs a few dot products per position instead of an fp32 LM head (a fifth of the model's FLOPs);
    the other logits stay bf16-rounded, far below the candidates that greedy decoding or sampling can pick."""
    hooks = getattr(model, "_vlsafe_exact_logits", None)
    if not on:
        for handle in hooks or ():
            handle.remove()
        model._vlsafe_exact_logits = None
        return
    if hooks:
        return
    head, norm = model.get_output_embeddings(), _final_norm(model)
    if head is None or getattr(head, "bias", None) is not None:
        return

    def norm_fp32(module, args, output):
        return _rms_norm_fp32(module, args[0])

    def keep_input(module, args):
        module._vlsafe_hidden = args[0]
        return (args[0].to(module.weight.dtype),) + tuple(args[1:])

    def refine(module, args, output):
        hidden, module._vlsafe_hidden = module._vlsafe_hidden, None
        logits = output.float()
        top = logits.topk(min(EXACT_CANDIDATES, logits.shape[-1]), dim=-1).indices
        exact = (module.weight[top].float() @ hidden.float().unsqueeze(-1)).squeeze(-1)
        return logits.scatter(-1, top, exact)

    handles = [head.register_forward_pre_hook(keep_input), head.register_forward_hook(refine)]
    if norm is not None:  # a norm not found: the hidden state reaches the head bf16-rounded, the logits still fp32
        handles.append(norm.register_forward_hook(norm_fp32))
    model._vlsafe_exact_logits = handles + _fp32_residual(model)  # last: its probe runs the whole model


def _final_norm(model):
    """The RMS norm just before the LM head (Llama-family decoders, also inside a vlsafe VLM), or None."""
    decoder = model.language_model if hasattr(model, "language_model") else model
    decoder = decoder.get_decoder() if hasattr(decoder, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    if norm is None or not hasattr(norm, "weight") or getattr(norm, "bias", None) is not None:
        return None
    probe = torch.randn(2, norm.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(norm.weight)
    with torch.inference_mode():  # another arithmetic (LayerNorm's mean, Gemma's 1 + weight): leave it alone
        same = torch.allclose(norm(probe).float(), _rms_norm_fp32(norm, probe).float(), rtol=2e-2, atol=1e-2)
    return norm if same else None


def _rms_norm_fp32(norm, x: torch.Tensor) -> torch.Tensor:
    """RMS norm in fp32 (as Llama's computes inside), its output left unrounded."""
    x = x.float()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
