"""Vision towers: HF CLIP/SigLIP (by id or path), the offline EfficientNet-Lite0, and a tiny random "pico" CLIP.

A tower spec resolves to a `TowerSpec`: what goes into the VLM config (kind, vision config, feature layer, token
count), a module with loaded weights, and the image processor that turns PIL images into its pixel values.
HF towers keep their own module and parameter names so a VLM with one exports to `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlsafe.errors import VlsafeError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

BUILTIN_TOWERS = ("efficientnet-lite0", "pico")
PICO_LAYERS = 2


@dataclass
class TowerSpec:
    kind: str  # "hf" (CLIP/SigLIP vision model) or "efficientnet-lite0"
    module: nn.Module
    image_processor: object
    vision_config: object | None  # a transformers vision config for "hf" towers
    hidden_size: int
    num_image_tokens: int
    feature_layer: int
    select_strategy: str  # "default" drops the CLS token (CLIP), "full" keeps every token (SigLIP)
    source: str


def image_processor_for(size: int, mean, std):
    """One preprocessing for every tower: resize the short side, centre crop, rescale, normalise."""
    # the PIL backend: same numbers as LLaVA's preprocessing, and no torchvision (which would pull a CUDA torch)
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def build_tower_module(kind: str, vision_config) -> nn.Module:
    """An untrained tower module of the given kind (weights come from a checkpoint or `resolve_tower`)."""
    if kind == "efficientnet-lite0":
        from vlsafe.model.efficientnet import EfficientNetLite0

        return EfficientNetLite0()
    if kind == "hf":
        from transformers import AutoModel

        return AutoModel.from_config(vision_config)
    raise VlsafeError(f"unknown tower kind {kind!r} (known: hf, efficientnet-lite0)")


def count_hf_tokens(vision_config, select_strategy: str) -> int:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    has_cls = vision_config.model_type.startswith("clip")
    return patches + (1 if has_cls and select_strategy == "full" else 0)


def tower_features(module: nn.Module, kind: str, pixel_values: torch.Tensor, feature_layer: int,
                   select_strategy: str) -> torch.Tensor:
    """(B, 3, H, W) pixel values -> (B, tokens, hidden) visual features, the LLaVA way for HF towers."""
    if kind == "efficientnet-lite0":
        return module(pixel_values, feature_layer)
    out = module(pixel_values, output_hidden_states=True, return_dict=True)
    feats = out.hidden_states[feature_layer]
    if select_strategy == "default" and module.config.model_type.startswith("clip"):
        feats = feats[:, 1:]
    return feats


def _pico(seed: int, feature_layer: int | None) -> TowerSpec:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=PICO_LAYERS,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    torch.manual_seed(seed)
    module = CLIPVisionModel(config).eval()
    return TowerSpec("hf", module, image_processor_for(32, CLIP_MEAN, CLIP_STD), config, 32,
                     count_hf_tokens(config, "default"), -2 if feature_layer is None else feature_layer, "default",
                     "pico")


def _efficientnet(feature_layer: int | None) -> TowerSpec:
    from vlsafe import assets
    from vlsafe.model.efficientnet import EfficientNetLite0, feature_shapes, load_imagenet_state

    layer = -1 if feature_layer is None else feature_layer  # the head unless asked
    shapes = feature_shapes(224)
    _check_layer("efficientnet-lite0", layer, len(shapes))
    channels, side = shapes[layer]
    module = EfficientNetLite0().eval()
    load_imagenet_state(module, assets.asset_files("efficientnet-lite0")[0])
    return TowerSpec("efficientnet-lite0", module, image_processor_for(224, IMAGENET_MEAN, IMAGENET_STD), None,
                     channels, side * side, layer, "full", "efficientnet-lite0")


def _hf(spec: str, feature_layer: int, select_strategy: str | None, trust_remote_code: bool) -> TowerSpec:
    from transformers import AutoConfig, AutoImageProcessor

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises OSError/ValueError/HF errors for an unresolvable spec
        raise VlsafeError(f"vision tower {spec!r}: not a built-in tower ({', '.join(BUILTIN_TOWERS)}), "
                          f"a local HF directory or a reachable hub id ({type(err).__name__})") from None
    vision_config = getattr(config, "vision_config", config)
    if not vision_config.model_type.startswith(("clip", "siglip")):
        raise VlsafeError(f"vision tower {spec!r}: model type {vision_config.model_type!r} is not CLIP or SigLIP")
    # CLIPVisionModel/SiglipVisionModel.from_pretrained read the vision half of a full CLIP/SigLIP checkpoint too
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = CLIPVisionModel if vision_config.model_type.startswith("clip") else SiglipVisionModel
    module = cls.from_pretrained(spec, use_safetensors=True, trust_remote_code=trust_remote_code).eval()
    strategy = select_strategy or ("default" if vision_config.model_type.startswith("clip") else "full")
    processor = AutoImageProcessor.from_pretrained(spec, backend="pil", trust_remote_code=trust_remote_code)
    return TowerSpec("hf", module, processor, module.config, module.config.hidden_size,
                     count_hf_tokens(module.config, strategy), feature_layer, strategy, spec)


def _check_layer(source: str, layer: int, count: int) -> None:
    """One clear line unless `layer` indexes one of the tower's `count` feature maps (hidden states)."""
    if not -count <= layer < count:
        raise VlsafeError(f"{source}: feature layer {layer} does not exist (0 to {count - 1}, or -1 to -{count})")


def check_builtin_layer(spec: str, layer: int | None) -> str | None:
    """Without loading anything: the error line when a built-in tower has no feature map `layer`, else None
    (other towers are checked when they are loaded)."""
    from vlsafe.model.efficientnet import feature_shapes

    counts = {"efficientnet-lite0": len(feature_shapes(224)), "pico": PICO_LAYERS + 1}  # + the embeddings
    if layer is None or spec not in counts:
        return None
    try:
        _check_layer(spec, layer, counts[spec])
    except VlsafeError as err:
        return str(err)
    return None


def resolve_tower(spec: str, feature_layer: int | None = None, select_strategy: str | None = None, seed: int = 0,
                  trust_remote_code: bool = False) -> TowerSpec:
    """A tower from a spec: 'pico', 'efficientnet-lite0', a local HF directory, or a hub id (online users).

    `feature_layer` None is each tower's default: the layer before the last for HF towers (LLaVA's -2), the head
    for EfficientNet-Lite0 (-1)."""
    if spec == "efficientnet-lite0":
        return _efficientnet(feature_layer)
    if spec == "pico":
        tower = _pico(seed, feature_layer)
    elif not Path(spec).exists() and "/" not in spec:
        raise VlsafeError(f"unknown vision tower {spec!r} (built-in: {', '.join(BUILTIN_TOWERS)}; "
                          "or a local HF directory, or a hub id like openai/clip-vit-large-patch14-336)")
    else:
        tower = _hf(spec, -2 if feature_layer is None else feature_layer, select_strategy, trust_remote_code)
    _check_layer(tower.source, tower.feature_layer, tower.vision_config.num_hidden_layers + 1)  # + the embeddings
    return tower
