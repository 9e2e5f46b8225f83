"""`vlsafe lint-template`: render samples through a model's chat template and prove the label mask is right.

Fails when the masked labels do not decode to exactly the assistant turns, when the template renders a turn
differently as a generation prompt than inside the conversation (training and inference would then disagree),
when tokens merge across the prompt/answer boundary, or when image placeholders do not expand to the tower's count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlsafe.data.records import Conversation, Turn
from vlsafe.errors import VlsafeError
from vlsafe.model.chat import IGNORE_INDEX, ChatFormatter, to_messages


def builtin_samples(image_path: str | None) -> list[Conversation]:
    """Cases that break naive maskers: several turns, a system prompt, an image, edge whitespace, non-ASCII."""
    t = lambda role, text: Turn(role=role, content=text)  # noqa: E731
    samples = [
        Conversation(id="single", turns=[t("user", "What is 2 + 2?"), t("assistant", "2 + 2 = 4.")]),
        Conversation(id="system", turns=[t("system", "You are a careful assistant."), t("user", "Name a colour."),
                                         t("assistant", "Blue.")]),
        Conversation(id="multi", turns=[t("user", "Count to three."), t("assistant", "1, 2, 3."),
                                        t("user", "Now backwards, with emphasis!"),
                                        t("assistant", "3... 2... 1!\n\nDone — café ☕.")]),
    ]
    if image_path:
        samples.append(Conversation(id="image", image=image_path, turns=[
            t("user", "What shape is shown?"), t("assistant", "A red square."),
            t("user", "And its colour?"), t("assistant", "Red.")]))
    return samples


@dataclass
class LintReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    shown: list[tuple[str, list[tuple[str, bool]]]] = field(default_factory=list)  # (id, [(text, is_target)])


def _segments(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Consecutive runs of target / non-target tokens, decoded, for display."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or (labels[k] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((tokenizer.decode(ids[start:k]), labels[start] != IGNORE_INDEX))
            start = k
    return runs


def lint_conversation(fmt: ChatFormatter, conv: Conversation) -> tuple[list[str], list[tuple[str, bool]]]:
    tok = fmt.tokenizer
    try:
        enc = fmt.encode_conversation(conv)
    except VlsafeError as err:
        return [str(err)], []
    problems = []
    where = f"record {conv.id!r}"
    answers = [t.content for t in conv.turns if t.role == "assistant"]
    # runs of labelled tokens, one per assistant turn
    runs, current = [], []
    for tid, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    if not runs:
        problems.append(f"{where}: no token is labelled (the loss would be 0)")
    elif len(runs) != len(answers):
        problems.append(f"{where}: {len(runs)} labelled spans for {len(answers)} assistant turns")
    for k, (run, (start, end), answer) in enumerate(zip(runs, enc.spans, answers)):
        decoded, expected = tok.decode(run), enc.text[start:end]
        if decoded != expected:
            problems.append(f"{where}, assistant turn {k}: labels decode to {decoded!r}, expected {expected!r}")
        if not expected.startswith(answer) and answer.strip() not in expected:
            problems.append(f"{where}, assistant turn {k}: the template changes the answer text {answer!r}")
    # what the model is prompted with at inference must tokenise exactly as the start of the training sequence
    messages = to_messages(conv.turns, conv.image is not None)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_ids = fmt._tokenize(fmt.render(messages[:i], add_generation_prompt=True))[0]
        if enc.input_ids[: len(prompt_ids)] != prompt_ids:
            problems.append(f"{where}, assistant turn {i}: the generation prompt tokenises differently from the "
                            "same text inside the conversation (tokens merge across the boundary)")
    if conv.image is not None:
        n_image = enc.input_ids.count(fmt.image_token_id)
        if n_image != fmt.num_image_tokens:
            problems.append(f"{where}: {n_image} image tokens, the tower gives {fmt.num_image_tokens}")
    return problems, _segments(tok, enc.input_ids, enc.labels)


def lint(fmt: ChatFormatter, conversations: list[Conversation], show: int = 2) -> LintReport:
    report = LintReport()
    for conv in conversations:
        problems, segments = lint_conversation(fmt, conv)
        report.checked += 1
        report.problems += problems
        if len(report.shown) < show and segments:
            report.shown.append((conv.id, segments))
    return report


def read_conversations(path) -> list[Conversation]:
    """Records to lint: LLaVA JSON (.json) or vlsafe Conversation JSON lines (.jsonl)."""
    import json
    from pathlib import Path

    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise VlsafeError(f"{path}: file not found")
    if path.suffix == ".json":
        from vlsafe.data.formats import llava

        return list(llava.load(path))
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(Conversation.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as err:
            raise VlsafeError(f"{path}:{n}: not a Conversation record ({str(err).splitlines()[0][:120]})") from None
    return out
