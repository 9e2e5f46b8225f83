"""Chat formatting for the VLM: the LLM's own chat template, image placeholder expansion, assistant-only labels.

The assistant spans are found by rendering, not by guessing separator lengths: for assistant turn i, the template
rendered over turns[:i] with the generation prompt is a prefix P_i of the rendering R_i over turns[:i+1], and the
characters R_i[len(P_i):] (the answer and the template's end-of-turn marker) are the targets. Tokens are labelled
by their character offsets, so tokenisation never drifts from the text (LLaVA forks that count separator tokens by
hand get "tokenization mismatch" and silently train on loss 0). `lint` checks every assumption this rests on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlsafe.data.records import Conversation, Turn
from vlsafe.errors import VlsafeError

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image: str | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)  # character spans of the targets in `text`
    text: str = ""


def to_messages(turns: list[Turn], has_image: bool) -> list[dict]:
    """Chat-template messages; the image placeholder opens the first user turn, as LLaVA-1.5 does."""
    messages = [{"role": t.role, "content": t.content} for t in turns]
    if has_image:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = f"{IMAGE_TOKEN}\n{first_user['content']}"
    return messages


def check_plain(conv: Conversation) -> None:
    """A record LLaVA's plain pre-training format can hold: an image and one request with one answer (a caption)."""
    roles = [t.role for t in conv.turns]
    if conv.image is None or roles != ["user", "assistant"]:
        raise VlsafeError(f"record {conv.id!r}: template 'plain' needs an image and one request with one answer "
                          f"(a caption), not {'no image' if conv.image is None else ' + '.join(roles)}")


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise VlsafeError(f"{path}: cannot read image ({type(err).__name__})") from None


class ChatFormatter:
    """Turns records into model inputs for one (tokenizer, image processor, tower) combination."""

    def __init__(self, tokenizer, image_processor=None, image_token_id: int | None = None,
                 num_image_tokens: int = 0, max_length: int = 2048):
        if tokenizer.chat_template is None:
            raise VlsafeError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length

    @classmethod
    def for_model(cls, model, tokenizer, image_processor=None, max_length: int = 2048) -> "ChatFormatter":
        config = model.config
        if getattr(config, "model_type", "") == "vlsafe_vlm":
            return cls(tokenizer, image_processor, config.image_token_id, config.num_image_tokens, max_length)
        return cls(tokenizer, None, None, 0, max_length)  # a text-only LLM

    # --- rendering
    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _check_image(self, has_image: bool, record_id: str) -> None:
        if has_image and self.image_token_id is None:
            raise VlsafeError(f"record {record_id!r} has an image but the model is text-only")

    def _tokenize(self, text: str, spans: list[tuple[int, int]] = ()):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(spans))
        ids = list(enc["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for k, (start, _end) in enumerate(enc["offset_mapping"] if spans else []):
            if any(s <= start < e for s, e in spans):
                labels[k] = ids[k]
        return self._expand_images(ids, labels)

    def _expand_images(self, ids: list[int], labels: list[int]):
        if self.image_token_id is None or self.image_token_id not in ids:
            return ids, labels
        out_ids, out_labels = [], []
        for tok, lab in zip(ids, labels):
            if tok == self.image_token_id:
                out_ids += [tok] * self.num_image_tokens
                out_labels += [IGNORE_INDEX] * self.num_image_tokens
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        return out_ids, out_labels

    def assistant_spans(self, messages: list[dict], record_id: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character span of each assistant turn (answer + end-of-turn marker)."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not upto.startswith(prefix) or not full.startswith(upto):
                raise VlsafeError(f"record {record_id!r}: the chat template renders turn {i} differently as a "
                                  "generation prompt than inside the conversation (run `vlsafe lint-template`)")
            spans.append((len(prefix), len(upto)))
        return full, spans

    # --- training and prompting
    def encode_conversation(self, conv: Conversation) -> Encoded:
        self._check_image(conv.image is not None, conv.id)
        messages = to_messages(conv.turns, conv.image is not None)
        text, spans = self.assistant_spans(messages, conv.id)
        ids, labels = self._tokenize(text, spans)
        if len(ids) > self.max_length:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if conv.image is not None and ids.count(self.image_token_id) != self.num_image_tokens:
                raise VlsafeError(f"record {conv.id!r}: max_length {self.max_length} cuts through the image tokens")
        return Encoded(ids, labels, conv.image, spans, text)

    def encode_plain(self, conv: Conversation) -> Encoded:
        """LLaVA's pre-training ("plain") format: the image tokens, a newline, the caption and EOS; the caption
        and EOS are the targets. No chat template, system prompt or request: stage 1 learns to map image features
        into the LLM's word space, and a third of each example's tokens would be the same template text."""
        check_plain(conv)
        self._check_image(True, conv.id)
        eos = self.tokenizer.eos_token or ""
        head = f"{IMAGE_TOKEN}\n"
        text = f"{head}{conv.turns[1].content}{eos}"
        ids, labels = self._tokenize(text, [(len(head), len(text))])
        if len(ids) > self.max_length:
            if self.max_length <= self.num_image_tokens:
                raise VlsafeError(f"record {conv.id!r}: max_length {self.max_length} cuts through the image tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, conv.image, [(len(head), len(text))], text)

    def encode_prompt(self, text: str, image: str | None = None, system: str | None = None,
                      record_id: str = "") -> Encoded:
        """A single user request, rendered with the generation prompt, ready to generate from."""
        self._check_image(image is not None, record_id)
        turns = ([Turn(role="system", content=system)] if system else []) + [Turn(role="user", content=text)]
        rendered = self.render(to_messages(turns, image is not None), add_generation_prompt=True)
        ids, labels = self._tokenize(rendered)
        return Encoded(ids, labels, image, [], rendered)

    def pixel_values(self, images: list) -> torch.Tensor:
        loaded = [load_image(im) if isinstance(im, (str, Path)) else im.convert("RGB") for im in images]
        return self.image_processor(images=loaded, return_tensors="pt")["pixel_values"]

    def collate(self, batch: list[Encoded], padding_side: str = "right") -> dict:
        """Pads a batch (right for training, left for generation) and stacks the pixel values of its images."""
        width = max(len(e.input_ids) for e in batch)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            cols = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[row, cols] = torch.tensor(e.input_ids)
            labels[row, cols] = torch.tensor(e.labels)
            mask[row, cols] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        images = [e.image for e in batch if e.image is not None]
        if images:
            out["pixel_values"] = self.pixel_values(images)
        return out
