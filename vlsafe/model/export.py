"""Export a vlsafe VLM with an HF CLIP/SigLIP tower to `LlavaForConditionalGeneration` (for vLLM, TRL, lmms-eval).

The VLM's parameter names were chosen so this is a renaming: nothing is recomputed, and a test checks that
transformers alone loads the export and gives the same logits.
"""

from __future__ import annotations

from pathlib import Path

from vlsafe.errors import VlsafeError
from vlsafe.io import atomic_dir, versions, write_json


def llava_key(name: str) -> str:
    """vlsafe parameter name -> transformers-5 Llava parameter name."""
    if name.startswith("vision_tower."):
        return "model." + name
    if name.startswith("projector."):
        return "model.multi_modal_projector." + name[len("projector."):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    raise VlsafeError(f"parameter {name!r} has no place in a Llava checkpoint")


def export_hf(src: str | Path, out: str | Path) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from vlsafe.model import checkpoint

    bundle = checkpoint.load(src)
    if not bundle.is_vlm:
        raise VlsafeError(f"{src}: not a vlsafe VLM directory")
    config = bundle.model.config
    if config.tower_kind != "hf":
        raise VlsafeError(f"{src}: tower {config.tower_kind!r} has no HF Llava equivalent (only CLIP/SigLIP towers export)")
    if config.projector_type != "mlp2x_gelu":
        raise VlsafeError(f"{src}: projector {config.projector_type!r} has no HF Llava equivalent (needs mlp2x_gelu)")
    llava_config = LlavaConfig(
        vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict(),
        image_token_index=config.image_token_id, image_seq_length=config.num_image_tokens,
        projector_hidden_act="gelu", vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_feature_layer=config.vision_feature_layer, multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(config.text_config, "tie_word_embeddings", False)))
    llava = LlavaForConditionalGeneration(llava_config)
    state = {llava_key(k): v for k, v in bundle.model.state_dict().items()}
    missing, unexpected = llava.load_state_dict(state, strict=False)
    tied = set(getattr(llava, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise VlsafeError(f"{src}: export does not line up with Llava (missing {missing[:3]}, unexpected {unexpected[:3]})")
    llava.generation_config = bundle.model.generation_config
    vision = config.vision_config
    processor = LlavaProcessor(
        image_processor=bundle.image_processor, tokenizer=bundle.tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, image_token=config.image_token,
        num_additional_image_tokens=1 if vision.model_type.startswith("clip") else 0,
        chat_template=bundle.tokenizer.chat_template)
    with atomic_dir(out) as tmp:
        llava.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_json(tmp / "vlsafe.json", {"exported_from": str(src), "versions": versions()})
    return Path(out)
