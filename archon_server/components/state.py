"""The typed state that the components of a graph read and write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..backends.base import content_text


@dataclass
class Candidate:
    text: str
    source: str = ""  # component id / model that produced it
    score: float | None = None  # set by rankers, verifiers, evaluators, votes: higher is better
    finish_reason: str = "stop"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No answer in it: blank text and no tool calls (a sample that stopped at once, an empty synthesis)."""
        return not self.text.strip() and not self.meta.get("tool_calls")


@dataclass
class State:
    messages: list[dict[str, Any]]  # the client's conversation
    candidates: list[Candidate] = field(default_factory=list)
    critiques: list[str | None] = field(default_factory=list)  # aligned with candidates
    unit_tests: list[str] = field(default_factory=list)
    votes: dict[str, int] = field(default_factory=dict)

    @property
    def query(self) -> str:
        """The latest user message as text (what prompts of judges quote)."""
        for m in reversed(self.messages):
            if m.get("role") == "user":
                return message_text(m)
        return message_text(self.messages[-1]) if self.messages else ""


def message_text(message: dict[str, Any]) -> str:
    return content_text(message.get("content"))


def candidate_meta(choice: Any) -> dict[str, Any]:
    """What a produced candidate keeps of its backend choice beyond the text: logprobs, and tool_calls if any."""
    meta: dict[str, Any] = {"logprobs": choice.logprobs}
    if getattr(choice, "tool_calls", None):
        meta["tool_calls"] = choice.tool_calls
    return meta


@dataclass
class Update:
    """What one component returns; the runtime merges the updates of a layer."""

    candidates: list[Candidate] | None = None  # new candidates produced (generator, fuser, self_moa_seq)
    selected: list[Candidate] | None = None  # the kept subset of the incoming ones (ranker, verifier, vote...)
    critiques: list[str | None] | None = None
    unit_tests: list[str] | None = None
    votes: dict[str, int] | None = None
