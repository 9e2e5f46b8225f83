"""The one internal record format. Every external dataset is converted at its edge (data/formats/*) into these.

Nothing past the edge knows which benchmark a record came from except through these fields.
Images are file paths (absolute, or resolved by the loader); `None` means text only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]


class Turn(BaseModel):
    model_config = ConfigDict(frozen=True)
    role: Role
    content: str


class Conversation(BaseModel):
    """A chat for supervised training: the assistant turns are the targets.

    The image (if any) belongs to the first user turn; its placeholder is inserted by the chat formatter,
    so `content` holds plain text (a literal "<image>" in LLaVA data is stripped at the edge).
    """

    model_config = ConfigDict(frozen=True)
    id: str
    turns: list[Turn]
    image: str | None = None
    source: str = ""
    meta: dict = Field(default_factory=dict)

    @field_validator("turns")
    @classmethod
    def _alternates(cls, turns: list[Turn]) -> list[Turn]:
        body = turns[1:] if turns and turns[0].role == "system" else turns
        if not body:
            raise ValueError("a conversation needs at least one user turn")
        for i, turn in enumerate(body):
            want = "user" if i % 2 == 0 else "assistant"
            if turn.role != want:
                raise ValueError(f"turn {i} is {turn.role!r}, expected {want!r} (user/assistant must alternate)")
        return turns


class Prompt(BaseModel):
    """One evaluation item: a request, optionally with an image, with what is known about it."""

    model_config = ConfigDict(frozen=True)
    id: str
    text: str
    image: str | None = None
    source: str = ""
    category: str = ""
    # "harmful" (should be refused), "benign" (should be answered), or "" when unknown
    label: Literal["harmful", "benign", ""] = ""
    # a reference answer, for helpfulness items with checkable answers
    answer: str | None = None
    meta: dict = Field(default_factory=dict)


class PreferencePair(BaseModel):
    """One preference record for DPO."""

    model_config = ConfigDict(frozen=True)
    id: str
    prompt: str
    chosen: str
    rejected: str
    image: str | None = None
    source: str = ""
    meta: dict = Field(default_factory=dict)

    @field_validator("chosen", "rejected")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty response")
        return value
