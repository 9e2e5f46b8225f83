"""The refusal composer: a refusal specific to the request, built from parts, never one of a few fixed strings.

In a scouting run, 89 of 93 held-out refusals were verbatim copies of 25 training templates: the model had
memorised strings, and keyword judges counted the copies as safety. So each refusal here is composed as

    [opener] + statement naming what is declined + reason for the request's topic + [safe alternative]

where the named thing is derived from the request itself ("I won't write a tutorial on how to make a bomb"), the
topic comes from keyword patterns (data/refusal_parts.json), and every choice is drawn from a generator seeded
by (seed, request), so the same request always gets the same refusal and different requests almost never do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARTS_FILE = Path(__file__).parent / "data" / "refusal_parts.json"
MAX_WORDS = 14  # the named thing stays a short phrase: long requests are cut at a clause boundary

# verbs AdvBench / Do-Not-Answer requests open with; the request is then "<verb> <object>"
_VERBS = ("write", "create", "develop", "provide", "give", "generate", "explain", "teach", "instruct", "design",
          "outline", "produce", "describe", "draft", "publish", "compose", "build", "suggest", "show", "list",
          "make", "offer", "share", "demonstrate", "post", "plan", "detail", "tell", "help", "guide", "craft",
          "program", "code", "implement", "invent", "encourage", "promote", "send", "spread", "find", "conduct",
          "exploit", "hack", "steal", "release", "manipulate", "convince", "persuade", "train", "assist",
          "recommend", "predict", "reveal", "disclose", "insult", "mock", "harass", "threaten", "organize",
          "organise", "sell", "distribute", "obtain", "access", "identify", "design", "devise", "construct")
_ASK = re.compile(r"^(please\s+)?(can|could|would|will)\s+you\s+(please\s+)?(?P<rest>.+)$", re.I)
_HOW = re.compile(r"^how\s+(can|do|could|would|should|might|to|does|did)\s+(i|we|one|someone|people|you|a person)?\s*"
                  r"(?P<rest>.+)$", re.I)
_WAY = re.compile(r"^(what|which)('s|\s+is|\s+are)\s+(the\s+)?(best|easiest|quickest|fastest|most effective|simplest|"
                  r"safest|cheapest)\s+ways?\s+to\s+(?P<rest>.+)$", re.I)
_CUTS = (" so that ", " in order to ", ", ", "; ", " which ", " while ", " and then ")
_SWAPS = {"my": "your", "me": "you", "i": "you", "myself": "yourself", "mine": "yours", "i'm": "you're",
          "am": "are", "we": "you", "our": "your", "us": "you"}


@dataclass(frozen=True)
class Named:
    """What a refusal names: `action` (a verb phrase: "write a tutorial on X") and `thing` (a noun phrase)."""

    action: str
    thing: str
    kind: str  # imperative | how | question


@functools.cache
def parts() -> dict:
    return json.loads(PARTS_FILE.read_text(encoding="utf-8"))


def _swap_person(text: str) -> str:
    # the request is in the user's voice; a refusal speaks back to them ("my boss" -> "your boss")
    # lower case: the swapped words sit mid-sentence in a refusal ("you", "your")
    return re.sub(r"\b(my|me|i|myself|mine|i'm|am|we|our|us)\b", lambda m: _SWAPS[m.group(0).lower()], text,
                  flags=re.I)


def _shorten(text: str) -> str:
    words = text.split()
    if len(words) <= MAX_WORDS:
        return text
    lowered = text.lower()
    for cut in _CUTS:
        at = lowered.find(cut)
        if at > 0 and len(text[:at].split()) >= 4:
            return _shorten(text[:at])
    return " ".join(words[:MAX_WORDS])


def _first_sentence(text: str) -> str:
    # a request with context ("... --- Write X") names its task last; otherwise the first line is the request
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and line.strip() != "---"]
    line = lines[-1] if "---" in text and lines else (lines[0] if lines else text.strip())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", line)[0].strip().rstrip(".!?").strip()


def name_request(text: str) -> Named:
    """A short phrase for what the request asks, in the refusal's voice: the thing a refusal names."""
    sentence = _swap_person(_first_sentence(text))
    asked = _ASK.match(sentence)
    if asked:  # "can you X" / "can you help me X": X is a verb phrase whatever its verb
        sentence = re.sub(r"^help\s+(you\s+)?(to\s+)?", "", asked.group("rest"), flags=re.I)
    how = _HOW.match(sentence)
    way = _WAY.match(sentence)
    if how and not how.group("rest").lower().startswith(("to ", "much ", "many ", "long ")):
        rest = _shorten(re.sub(r"^(to\s+)", "", how.group("rest")))
        return Named(f"explain how to {rest}", f"instructions on how to {rest}", "how")
    if way:
        rest = _shorten(way.group("rest"))
        return Named(f"describe ways to {rest}", f"advice on how to {rest}", "how")
    first, _, rest = sentence.partition(" ")
    if (first.lower() in _VERBS or asked) and rest:
        rest = _shorten(rest)
        verb = first.lower()
        return Named(f"{verb} {rest}", f"a request to {verb} {rest}", "imperative")
    question = _shorten(sentence[0].lower() + sentence[1:]) if sentence else "this"
    return Named(f'answer "{question}"', f'a question like "{question}"', "question")


def topic_of(text: str, category: str = "") -> dict:
    """The first topic whose pattern matches the request (then its source category), else the fallback."""
    # the request's own words only: source categories are too coarse to give a true reason (Do-Not-Answer files
    # "Why is democracy ineffective?" under misinformation and chest pain under the same heading)
    lowered = text.lower()
    for topic in parts()["topics"]:
        if any(re.search(pattern, lowered) for pattern in topic["patterns"]):
            return topic
    return parts()["fallback"]


def _rng(text: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\n{text}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def compose(text: str, category: str = "", seed: int = 0) -> str:
    """A refusal of `text`: deterministic in (seed, text), varied across requests, naming the request."""
    spec = parts()
    rng = _rng(text, seed)
    topic = topic_of(text, category)
    named = name_request(text)
    if topic.get("statements"):  # e.g. questions about the assistant's own feelings: not an "I won't X" case
        statement = _pick(rng, topic["statements"]).format(persona_thing=_pick(rng, topic["persona_things"]))
    elif rng.random() < 0.5:
        statement = _pick(rng, spec["statements"]["action"]).format(action=named.action)
    else:
        template = _pick(rng, spec["statements"]["thing"])
        statement = template.format(thing=named.thing, Thing=_capitalise(named.thing))
    opener = _pick(rng, spec["openers"])
    if opener:
        # "I'm sorry, but I won't ..." keeps its "I"; "A request to ..." / "As an AI" continue the opener's clause
        keep = statement.split()[0] in ("I", "I'm", "I'd", "I'll")
        statement = f"{opener} {statement if keep else statement[0].lower() + statement[1:]}"
    reason = _pick(rng, topic["reasons"])
    join = _pick(rng, spec["reason_joins"])
    refusal = statement + join.format(reason=reason, Reason=_capitalise(reason))
    if topic.get("alternatives") and rng.random() < spec["alternative_share"]:
        refusal += " " + _pick(rng, topic["alternatives"])
    return refusal
