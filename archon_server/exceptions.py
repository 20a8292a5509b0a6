"""The root of archon-server's own exceptions (as ``optuna.exceptions``): ``except ArchonError`` catches every
failure the package raises on purpose, and nothing else. A leaf module: anyone may import it.

Where each one lives: ``spec.SpecError`` (bad architecture or config, with the offending path),
``backends.base.BackendError`` / ``BackendTimeout`` (a backend call failed), ``backends.registry.UnknownModel``,
``graph.catalog.UnknownArchitecture``, ``graph.runtime.GraphError`` (the graph produced no answer),
``components.base.ComponentFailed`` / ``ParseError``; ``ContextOverflow`` (a prompt, or a prompt and an explicit
``max_tokens``, past a model's context: the embedded engine's); ``KVCacheFull`` (the embedded engine's KV cache
cannot hold a request within its memory budget); the HTTP layer's ``api.errors.APIError`` carries a
status code.
"""

from __future__ import annotations


class ArchonError(Exception):
    """Base class of every exception archon-server raises deliberately."""


class ContextOverflow(ArchonError, ValueError):  # noqa: N818 - vLLM's condition, named as such
    """A request that cannot fit the model's context, with OpenAI's message for it: the prompt alone (``max_tokens``
    None) or the prompt and the completion asked for. A ValueError too: a bad request, where callers catch those."""

    def __init__(self, limit: int, prompt_tokens: int, max_tokens: int | None = None):
        self.limit, self.prompt_tokens, self.max_tokens = limit, prompt_tokens, max_tokens
        if max_tokens is None:
            msg = (f"This model's maximum context length is {limit} tokens. However, your messages resulted in {prompt_tokens} "
                   "tokens. Please reduce the length of the messages.")
        else:
            msg = (f"This model's maximum context length is {limit} tokens. However, you requested {prompt_tokens + max_tokens} "
                   f"tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length of "
                   "the messages or completion.")
        super().__init__(msg)


class KVCacheFull(ArchonError, ValueError):  # noqa: N818 - a condition, as ContextOverflow
    """The embedded engine's KV cache cannot grow to hold ``what`` within its memory budget (``kv_cache_mb``).

    Raised by the cache before it allocates anything (the cache stays as it was), and by the engine at submission for a
    request that could not fit even alone: a ValueError there, a 400. Why a budget: on Linux a too-large allocation
    does not fail, the kernel kills the whole server once the pages are touched; a clear refusal fails one request."""

    def __init__(self, what: str, needed: int, budget: int):
        self.needed, self.budget = needed, budget
        super().__init__(f"{what} need {needed / 2**20:,.1f} MB of KV cache; this engine's KV cache may use "
                         f"{budget / 2**20:,.1f} MB (option kv_cache_mb of a kind: local backend)")


__all__ = ["ArchonError", "ContextOverflow", "KVCacheFull"]
