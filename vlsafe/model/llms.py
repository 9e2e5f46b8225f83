"""Language models by spec: a registry preset, 'pico' (tests), a local HF directory or GGUF file, or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from vlsafe.errors import VlsafeError

PICO_TOKENIZER_FROM = "smollm2-135m-instruct"


def check_safetensors_dir(path: Path) -> None:
    """A local checkpoint must carry safetensors weights: pickled .bin/.pt files are never loaded."""
    if not path.is_dir():
        return
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        detail = f" (found {', '.join(sorted(pickled)[:3])}, which would need unpickling)" if pickled else ""
        raise VlsafeError(f"{path}: no .safetensors weights{detail}")


def llm_presets() -> list[str]:
    from vlsafe import assets

    return [a.name for a in assets.list_assets() if a.kind == "llm"]


def load_tokenizer(spec: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(spec), trust_remote_code=trust_remote_code)


def pico_llm(seed: int = 0):
    """A tiny random Llama with a real tokenizer (SmolLM2's, with its chat template), for tests."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from vlsafe.model import gguf

    tokenizer = load_tokenizer(gguf.tokenizer_dir(PICO_TOKENIZER_FROM))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval(), tokenizer


def _from_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # a GGUF load leaves a quantizer behind that refuses save_pretrained; the weights are dequantised already
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def resolve_llm(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, trust_remote_code: bool = False):
    """(model, tokenizer) for a spec: 'pico', a preset name, a local HF dir or .gguf file, or a hub id."""
    from transformers import AutoModelForCausalLM

    from vlsafe.model import gguf

    if spec == "pico":
        return pico_llm(seed)
    presets = llm_presets()
    if spec in presets:
        spec = str(gguf.llm_dir(spec))
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise VlsafeError(f"{path}: GGUF file not found")
        return _from_gguf(path, dtype)
    if not path.exists() and "/" not in spec:
        raise VlsafeError(f"unknown language model {spec!r} (presets: {', '.join(presets)}, "
                          "'pico'; or a local HF directory, a .gguf file, or a hub id)")
    check_safetensors_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise VlsafeError(f"language model {spec!r}: cannot load ({str(err).splitlines()[0][:200]})") from None
    return model.eval(), load_tokenizer(spec, trust_remote_code)


def llm_params(spec: str) -> int | None:
    """The parameters a token's computation passes through (vlsafe.bench.limits.model_params) in the LLM `spec`,
    without loading its weights: a preset's recorded count, else a model built on the meta device from the
    config.json of a local folder or of a hub id in the local cache; None where neither is at hand (or transformers
    cannot build it without remote code)."""
    from vlsafe import assets

    preset = {a.name: a for a in assets.list_assets()}.get(spec)
    if preset is not None:
        return preset.params
    path, config = Path(spec), None
    if path.is_dir():
        config = path / "config.json"
    elif "/" in spec and not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(spec, "config.json")
            config = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - a malformed id or no cache: not at hand
            config = None
    if config is None or not config.is_file():
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlsafe.bench.limits import model_params

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config.parent))
    except Exception:  # noqa: BLE001 - not a causal LM transformers builds unaided: no size, not a failed dry run
        return None
    return model_params(model)
