"""Building, saving and loading models: a VLM (or a text LLM) with its tokenizer and image processor.

A checkpoint is an HF-style directory: model safetensors + config.json, the tokenizer with the LLM's own chat
template, preprocessor_config.json for the image processor, and vlsafe.json recording where it came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vlsafe.errors import VlsafeError
from vlsafe.io import atomic_dir, verify_model_dir, versions, weights_content_hash, write_json
from vlsafe.model.chat import IMAGE_TOKEN, ChatFormatter
from vlsafe.model.vlm import VisionLanguageModel, VlmConfig, register

register()

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Bundle:
    """A model with what it needs to read inputs. `image_processor` is None for a text-only LLM."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object | None = None
    source: str = ""

    @property
    def is_vlm(self) -> bool:
        return isinstance(self.model, VisionLanguageModel)

    def formatter(self, max_length: int = 2048) -> ChatFormatter:
        return ChatFormatter.for_model(self.model, self.tokenizer, self.image_processor, max_length)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise VlsafeError(f"unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def build_vlm(llm: str, tower: str, projector: str = "mlp2x_gelu", feature_layer: int | None = None,
              select_strategy: str | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
              trust_remote_code: bool = False) -> Bundle:
    """VLM@0: a pretrained LLM and tower joined by a freshly initialised projector (seeded)."""
    from vlsafe.model.llms import resolve_llm
    from vlsafe.model.towers import resolve_tower

    language_model, tokenizer = resolve_llm(llm, dtype=dtype, seed=seed, trust_remote_code=trust_remote_code)
    spec = resolve_tower(tower, feature_layer, select_strategy, seed=seed, trust_remote_code=trust_remote_code)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= language_model.get_input_embeddings().weight.shape[0]:
        # the new row's value never matters to the outputs (image features replace it in every forward pass),
        # but it is in the weights the content hash covers: seeded, so the same build gives the same hash
        torch.manual_seed(seed)
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    config = VlmConfig(text_config=language_model.config, vision_config=spec.vision_config, tower_kind=spec.kind,
                       vision_hidden_size=spec.hidden_size, num_image_tokens=spec.num_image_tokens,
                       vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=spec.select_strategy,
                       projector_type=projector, image_token_id=image_token_id,
                       # an unset implementation would be pushed down onto the LM's (shared) config, unsetting it
                       attn_implementation=language_model.config._attn_implementation or "sdpa")
    torch.manual_seed(seed)
    model = VisionLanguageModel(config, language_model=language_model, vision_tower=spec.module)
    model.to(dtype).eval()
    if getattr(language_model, "generation_config", None) is not None:
        model.generation_config = language_model.generation_config
    return Bundle(model, tokenizer, spec.image_processor, f"build(llm={llm}, tower={tower})")


def content_hash(path: str | Path) -> str:
    """sha256 over the weight files of a checkpoint: what the evaluation cache keys generations by. Each file's
    hash is remembered by (path, size, mtime) in the cache, so checking a checkpoint again costs a stat."""
    return weights_content_hash(path)


def save(bundle: Bundle, out: str | Path, provenance: dict | None = None, overwrite: bool = False) -> Path:
    """Writes the whole checkpoint into a temp dir and renames it to `out` only when complete."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        bundle.model.save_pretrained(tmp, safe_serialization=True)
        bundle.tokenizer.save_pretrained(tmp)
        if bundle.image_processor is not None:
            bundle.image_processor.save_pretrained(tmp)
        write_json(tmp / "vlsafe.json", {"source": bundle.source, "provenance": provenance or {},
                                         "content_sha256": content_hash(tmp), "versions": versions()})
    return out


def load(spec: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> Bundle:
    """A vlsafe VLM directory, or any LLM spec (preset, 'pico', HF dir, .gguf, hub id) as a text-only model."""
    from transformers import AutoImageProcessor

    from vlsafe.model.llms import check_safetensors_dir, load_tokenizer, resolve_llm

    path = Path(spec)
    config_file = path / "config.json"
    if path.is_dir():
        verify_model_dir(path)  # whole files, and the content hash vlsafe.json recorded, before anything loads
    if path.is_dir() and config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise VlsafeError(f"{config_file}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if model_type == VlmConfig.model_type:
            check_safetensors_dir(path)
            model = VisionLanguageModel.from_pretrained(path, dtype=dtype).eval()
            return Bundle(model, load_tokenizer(path), AutoImageProcessor.from_pretrained(path, backend="pil"), str(path))
    model, tokenizer = resolve_llm(str(spec), dtype=dtype, trust_remote_code=trust_remote_code)
    return Bundle(model, tokenizer, None, str(spec))
