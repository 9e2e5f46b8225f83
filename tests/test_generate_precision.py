"""bf16 generation: the logits that pick the next token are computed in fp32, and fp32 is restored exactly."""

from __future__ import annotations

import pytest
import torch

from vlsafe import precision
from vlsafe.data.records import Prompt
from vlsafe.eval import generate as generation
from vlsafe.model import checkpoint


def _exact(model, ids: torch.Tensor) -> torch.Tensor:
    """Every logit in fp32 from the bf16 model's last hidden state: the fp32 RMS norm, then the (bf16) head."""
    lm = model.language_model if hasattr(model, "language_model") else model
    norm, seen = lm.get_decoder().norm, []
    handle = norm.register_forward_hook(lambda module, args, output: seen.append(args[0]))  # the norm's input
    with torch.inference_mode():
        model(input_ids=ids)
    handle.remove()
    hidden = seen[0].float()
    x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return (norm.weight.float() * x) @ model.get_output_embeddings().weight.float().T


@pytest.mark.parametrize("kind", ["llm", "vlm"])
def test_bf16_model_gives_fp32_logits_exact_for_its_top_candidates(kind):
    bundle = checkpoint.load("pico") if kind == "llm" else checkpoint.build_vlm("pico", "pico", seed=0)
    ids = torch.tensor([bundle.tokenizer("Why is the sky blue? Tell me more.")["input_ids"]])
    with torch.inference_mode():
        fp32 = bundle.model(input_ids=ids).logits
    model = generation.set_precision(bundle, "bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    lm = model.language_model if hasattr(model, "language_model") else model
    layer_out = []
    handle = lm.get_decoder().layers[0].register_forward_hook(lambda module, args, output: layer_out.append(output))
    with torch.inference_mode():
        result = model(input_ids=ids, use_cache=True)
    handle.remove()
    logits = result.logits
    assert logits.dtype == torch.float32  # not bf16: no rounding to steps of 2^-8 of the logit's size
    hidden = layer_out[0][0] if isinstance(layer_out[0], tuple) else layer_out[0]
    assert hidden.dtype == torch.float32  # the residual stream is not rounded to bf16 after each layer
    assert result.cache.layers[0].keys.dtype == torch.bfloat16  # while the KV cache and matmuls are bf16
    exact = _exact(model, ids)
    # the refined candidates are bf16's best 8; the exact best 3 are among them (the 8th may not be)
    top = exact.topk(3, dim=-1).indices
    torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    # the bf16 model stays near the fp32 one (the same weights, rounded)
    assert (logits.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.5

    generation.set_precision(bundle, "fp32")  # back to fp32: no hook left, the fp32 logits as before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bundle.model.modules())
    with torch.inference_mode():
        assert bundle.model(input_ids=ids).logits.dtype == torch.float32


def test_bf16_generations_are_keyed_apart_from_fp32_and_from_unrefined_bf16():
    fp32, bf16 = generation.Decoding(max_new_tokens=4), generation.Decoding(max_new_tokens=4, dtype="bf16")
    assert "fp32" not in fp32.key()  # fp32 keys unchanged: caches written before stay valid
    assert f"top{precision.EXACT_CANDIDATES}-logits" in bf16.key()


def test_a_model_the_fp32_residual_does_not_fit_falls_back_to_whole_bf16():
    bundle = checkpoint.load("pico")

    def refuse_fp32(module, args):  # stands for an architecture whose layers need inputs in their weights' dtype
        if args[0].dtype == torch.float32:
            raise RuntimeError("expected m1 and m2 to have the same dtype")

    bundle.model.model.layers[0].register_forward_pre_hook(refuse_fp32)
    model = generation.set_precision(bundle, "bf16")
    assert len(model._vlsafe_exact_logits) == 3  # the LM head's two hooks and the final norm's, nothing else
    ids = torch.tensor([bundle.tokenizer("Name a colour.")["input_ids"]])
    with torch.inference_mode():
        assert model(input_ids=ids).logits.dtype == torch.float32
    assert len(generation.generate(bundle, [Prompt(id="0", text="Name a colour.")],
                                   generation.Decoding(max_new_tokens=3, dtype="bf16"))) == 1
