"""VisionLanguageModel: vision tower + projector + HF causal LM, the LLaVA-1.5 recipe, as a transformers model.

It is a `PreTrainedModel` with its own config class, registered with AutoConfig / AutoModel / AutoModelForCausalLM
when vlsafe is imported (no remote code), taking `input_ids, attention_mask, pixel_values, labels` like HF VLMs.
So Trainer, PEFT, TRL and `generate` treat it as any HF model, and `save_pretrained` / `from_pretrained` give an
HF-style directory (safetensors, config.json). The image placeholder token is expanded to one token per visual
feature in the input ids (as HF Llava does), and the projected features replace those embeddings.

Parameter names: `vision_tower.*` (the HF vision model's own names), `projector.linear_1/2.*` (Llava's names),
`language_model.*` (the causal LM's own names), which makes the export to Llava a pure renaming.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from vlsafe.errors import VlsafeError
from vlsafe.model.towers import build_tower_module, tower_features

PROJECTORS = ("mlp2x_gelu", "linear")


class VlmConfig(PreTrainedConfig):
    model_type = "vlsafe_vlm"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", optional=True),
    }
    text_config: dict | PreTrainedConfig | None = None
    # the HF vision config for "hf" towers; None for towers vlsafe defines itself
    vision_config: dict | PreTrainedConfig | None = None
    tower_kind: str = "hf"
    vision_hidden_size: int = 0
    num_image_tokens: int = 0
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_type: str = "mlp2x_gelu"
    image_token_id: int = -1
    image_token: str = "<image>"


class Projector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu (Linear-GELU-Linear) or LLaVA-1's single linear map into the LM's embedding space."""

    def __init__(self, kind: str, vision_hidden: int, text_hidden: int):
        super().__init__()
        if kind not in PROJECTORS:
            raise VlsafeError(f"unknown projector {kind!r} (known: {', '.join(PROJECTORS)})")
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        if kind == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(features)
        if hasattr(self, "linear_2"):
            hidden = self.linear_2(self.act(hidden))
        return hidden


class VisionLanguageModel(PreTrainedModel, GenerationMixin):
    config_class = VlmConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: VlmConfig, language_model: PreTrainedModel | None = None,
                 vision_tower: nn.Module | None = None):
        super().__init__(config)
        self.vision_tower = vision_tower if vision_tower is not None else build_tower_module(
            config.tower_kind, config.vision_config)
        self.projector = Projector(config.projector_type, config.vision_hidden_size, config.text_config.hidden_size)
        self.language_model = language_model if language_model is not None else AutoModelForCausalLM.from_config(
            config.text_config)
        self.post_init()

    def _init_weights(self, module):
        # only the projector is ever initialised here: the tower and LM come with their own weights or init
        if isinstance(module, nn.Linear) and any(module is m for m in self.projector.modules()):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)

    # --- the HF model interface
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_image_tokens, LM hidden)."""
        tower_dtype = next(self.vision_tower.parameters()).dtype
        feats = tower_features(self.vision_tower, self.config.tower_kind, pixel_values.to(tower_dtype),
                               self.config.vision_feature_layer, self.config.vision_feature_select_strategy)
        if feats.shape[-1] != self.config.vision_hidden_size or feats.shape[1] != self.config.num_image_tokens:
            raise VlsafeError(f"vision tower gives {tuple(feats.shape[1:])} features; the projector expects "
                              f"({self.config.num_image_tokens}, {self.config.vision_hidden_size})")
        return self.projector(feats.to(self.projector.linear_1.weight.dtype))

    def embed(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's features scattered over its placeholder tokens."""
        embeds = self.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        if pixel_values is None:
            if n_slots:
                raise VlsafeError(f"{n_slots} image tokens in the input but no image was given")
            return embeds
        feats = self.get_image_features(pixel_values)
        if n_slots != feats.shape[0] * feats.shape[1]:
            raise VlsafeError(f"{n_slots} image tokens in the input for {feats.shape[0]} image(s) of "
                              f"{feats.shape[1]} tokens each")
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        # position_ids and logits_to_keep are named so that `generate` passes them: positions that skip padding
        # (batches whose rows are padded in the middle), and logits for the last position only while decoding
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                                   position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)


def register() -> None:
    """Makes `AutoModel*.from_pretrained` load vlsafe VLM directories without remote code."""
    try:
        AutoConfig.register(VlmConfig.model_type, VlmConfig)
        AutoModel.register(VlmConfig, VisionLanguageModel)
        AutoModelForCausalLM.register(VlmConfig, VisionLanguageModel)
    except ValueError:  # already registered
        pass
