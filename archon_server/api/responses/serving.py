"""The logic behind POST /v1/responses: the same graph run as chat (ChatService's run path), answered as a
Response object or as the Responses API's typed event stream.

Stream: response.created, response.in_progress, then per output item output_item.added, (message:)
content_part.added, output_text.delta..., output_text.done, content_part.done / (function call:)
function_call_arguments.delta..., function_call_arguments.done, then output_item.done; last response.completed,
response.incomplete (a truncated answer, `status: incomplete`, as OpenAI sends it; vLLM sends it inside a
response.completed) or response.failed. Every event carries a `sequence_number` counting from 0.

`previous_response_id`: the last ``MAX_KEPT`` stored responses (``store``, default true) are kept in memory with
their conversation (GET /v1/responses/{id} returns them, GET .../input_items lists what each was made from, DELETE
forgets one); an id that is not kept (unknown, evicted, deleted, or from before a restart) is a 400 (a 404 for GET and
DELETE) saying so. `truncation: "auto"` drops the oldest turns of a conversation past the context (fit.drop_oldest).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ...backends.base import StreamChunk, TokenLogprob, accumulate_tool_calls
from ...components import FinalOverrides
from ...components.fit import drop_oldest
from ...components.state import Candidate
from ...graph.catalog import is_passthrough
from ...graph.runtime import RunResult
from ...spec import ArchitectureSpec
from ..chat.serving import ChatService, final_extra
from ..errors import RESPONSES_FIELDS, APIError
from ..ids import new_id
from ..logprobs import responses_logprobs
from ..streaming import EventStream
from ..structured import chat_tool_choice, chat_tools
from .protocol import ResponsesRequest, input_items, input_messages

MAX_KEPT = 256  # responses kept for previous_response_id (each holds its conversation: bounded by count)


def _id(prefix: str) -> str:
    return new_id(prefix + "_")


def _usage(res: RunResult) -> dict[str, Any]:
    u = res.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": u.total_tokens}


def _message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}] if status != "in_progress" else []}


def _call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"id": item_id, "type": "function_call", "call_id": call.get("id") or item_id.replace("fc_", "call_", 1),
            "name": fn.get("name", ""), "arguments": fn.get("arguments", "") if status != "in_progress" else "", "status": status}


@dataclass(frozen=True)
class _Prepared:
    """A request made ready to run: the graph, its messages (instructions first, truncated if asked), what the final
    stage must produce; and what a stored response keeps: the conversation a follow-up continues, its input items."""

    spec: ArchitectureSpec
    messages: list[dict[str, Any]]
    final: FinalOverrides
    conversation: list[dict[str, Any]]
    items: list[dict[str, Any]]


class ResponsesService:
    def __init__(self, chat: ChatService):
        self.chat = chat
        self.kept: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()  # id -> the conversation it ends
        self.bodies: dict[str, dict[str, Any]] = {}  # id -> the Response object (GET /v1/responses/{id})
        self.items: dict[str, list[dict[str, Any]]] = {}  # id -> its input items (GET /v1/responses/{id}/input_items)

    # -- request -> run -----------------------------------------------------------------
    async def _prepare(self, req: ResponsesRequest) -> _Prepared:
        try:
            new = input_messages(req.input)
            new_items = input_items(req.input, _id)
            fmt = req.response_format()
            tools = chat_tools(req.tools) if req.tools else None
        except ValueError as e:
            param = str(e).split(":")[0]
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        history: list[dict[str, Any]] = []
        history_items: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            if req.previous_response_id not in self.kept:
                raise APIError(400, f"previous_response_id: response {req.previous_response_id!r} is not kept by this server "
                               f"(it keeps the last {MAX_KEPT} stored responses in memory, until restart); send the whole "
                               "conversation as `input` instead", param="previous_response_id", code="previous_response_not_found")
            self.kept.move_to_end(req.previous_response_id)
            history = self.kept[req.previous_response_id]
            history_items = [*self.items[req.previous_response_id], *self.bodies[req.previous_response_id]["output"]]
        conversation = [*history, *new]  # what a follow-up continues (instructions are not carried over, as OpenAI)
        messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
        if not any(m["role"] in ("user", "system", "developer") and m["content"] for m in messages):
            raise APIError(400, "input: at least one non-empty user message (or instructions) is required", param="input", code="invalid_value")
        if len(messages) > self.chat.max_messages:
            raise APIError(400, f"input: at most {self.chat.max_messages} messages", param="input", code="invalid_value")
        spec = self.chat.resolve(req)
        if req.truncation == "auto":  # the oldest turns go until it fits every model that reads the conversation
            messages, _ = await drop_oldest(self.chat.registry, spec.models_used(), messages, req.max_output_tokens,
                                                   share=1.0 if is_passthrough(spec) else 0.5)
        final = FinalOverrides(
            n=1, temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_output_tokens,
            logprobs=req.wants_logprobs(), top_logprobs=(req.top_logprobs or 0) if req.wants_logprobs() else 0,
            extra=final_extra(fmt, tools, chat_tool_choice(req.tool_choice), req.parallel_tool_calls),
        )
        final = self.chat.refuse_overflow(spec, final)
        self.chat.check_final(spec, final, format_param="text.format")
        return _Prepared(spec, messages, final, conversation, [*history_items, *new_items])

    def _keep(self, req: ResponsesRequest, rid: str, prep: _Prepared, cand: Candidate, body: dict[str, Any]) -> None:
        if not req.store:
            return
        turn: dict[str, Any] = {"role": "assistant", "content": cand.text}
        if cand.meta.get("tool_calls"):
            turn["tool_calls"] = cand.meta["tool_calls"]
        self.kept[rid] = [*prep.conversation, turn]
        self.bodies[rid] = body
        self.items[rid] = prep.items
        while len(self.kept) > MAX_KEPT:
            old, _ = self.kept.popitem(last=False)
            self.bodies.pop(old, None)
            self.items.pop(old, None)

    def retrieve(self, rid: str) -> dict[str, Any]:
        if rid not in self.bodies:
            raise APIError(404, f"response {rid!r} is not kept by this server (it keeps the last {MAX_KEPT} stored responses in memory, until restart)",
                           param="response_id", code="response_not_found")
        return self.bodies[rid]

    def delete(self, rid: str) -> dict[str, Any]:
        """DELETE /v1/responses/{id}: forget a stored response (its body and the conversation it ends), as OpenAI's; a
        later `previous_response_id` naming it is then the 400 of one not kept."""
        self.retrieve(rid)  # the same 404 for an id not kept
        self.kept.pop(rid, None)
        self.bodies.pop(rid, None)
        self.items.pop(rid, None)
        return {"id": rid, "object": "response", "deleted": True}

    def input_items(self, rid: str, after: str | None = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        """GET /v1/responses/{id}/input_items: the items the response was made from - its conversation, earlier turns
        (through ``previous_response_id``) included, instructions not - as OpenAI's cursor page: ``order`` (newest
        first by default), ``limit`` of them after the item ``after``, ``has_more`` when more follow."""
        self.retrieve(rid)  # the same 404 for an id not kept
        items = self.items[rid] if order == "asc" else self.items[rid][::-1]
        start = 0
        if after is not None:
            ids = [it["id"] for it in items]
            if after not in ids:
                raise APIError(400, f"after: {after!r} is not an input item of response {rid!r}", param="after", code="invalid_value")
            start = ids.index(after) + 1
        page = items[start:start + limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}

    def _shell(self, req: ResponsesRequest, rid: str, created: int, status: str) -> dict[str, Any]:
        """The Response object around the output: what the client asked for, echoed back."""
        fmt = (req.text.format if req.text and req.text.format else None) or {"type": "text"}
        return {
            "id": rid, "object": "response", "created_at": created, "status": status, "error": None,
            "incomplete_details": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": req.model, "output": [], "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "temperature": req.temperature, "top_p": req.top_p,
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "text": {"format": fmt},
            "metadata": req.metadata or {}, "store": req.store, "user": req.user, "usage": None,
            "truncation": req.truncation or "disabled",
        }

    def _finish(self, req: ResponsesRequest, shell: dict[str, Any], res: RunResult, output: list[dict[str, Any]]) -> dict[str, Any]:
        cand = res.candidates[0]
        truncated = cand.finish_reason == "length"
        out = {**shell, "status": "incomplete" if truncated else "completed", "output": output, "usage": _usage(res)}
        if truncated:
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        out["completed_at"] = int(time.time())
        if req.return_trace:
            out["trace"] = res.trace.to_dict()
        return out

    @staticmethod
    def _output(cand: Candidate, msg_id: str, call_ids: list[str]) -> list[dict[str, Any]]:
        status = "incomplete" if cand.finish_reason == "length" else "completed"
        calls = cand.meta.get("tool_calls") or []
        items = [_message_item(msg_id, cand.text, status, responses_logprobs(cand.meta.get("logprobs")))] if cand.text or not calls else []
        return items + [_call_item(call_ids[j] if j < len(call_ids) else _id("fc"), c, "completed") for j, c in enumerate(calls)]

    # -- non-streaming ------------------------------------------------------------------
    async def create(self, req: ResponsesRequest, raw: Request) -> dict[str, Any]:
        prep = await self._prepare(req)
        rid = _id("resp")
        res = await self.chat.execute(prep.spec.name, lambda: self.chat.run_graph(prep.spec, prep.messages, prep.final), raw,
                                      keep=lambda status, r, e: self.chat._keep(rid, req.model, prep.messages, False, status, r, e),
                                      fields=RESPONSES_FIELDS)
        body = self._finish(req, self._shell(req, rid, int(time.time()), "in_progress"), res, self._output(res.candidates[0], _id("msg"), []))
        self._keep(req, rid, prep, res.candidates[0], body)
        return body

    # -- streaming ----------------------------------------------------------------------
    async def create_stream(self, req: ResponsesRequest, raw: Request | None = None) -> EventStream:
        prep = await self._prepare(req)
        rid = _id("resp")
        events = await self.chat.open_stream(prep.spec.name, lambda sink, _observer: self.chat.run_graph(prep.spec, prep.messages, prep.final, sink),
                                             keep=lambda status, r, e: self.chat._keep(rid, req.model, prep.messages, True, status, r, e),
                                             raw=raw, direct=is_passthrough(prep.spec), fields=RESPONSES_FIELDS)
        stream = EventStream()  # the body sets the ending: response.failed, numbered after what it sent
        return stream.of(self._stream(req, rid, prep, events, stream))

    async def _stream(self, req: ResponsesRequest, rid: str, prep: _Prepared, events: AsyncIterator[Any],
                      stream: EventStream) -> AsyncIterator[str]:
        created = int(time.time())  # integer seconds, as OpenAI's
        shell = self._shell(req, rid, created, "in_progress")
        seq = 0

        def ev(kind: str, **payload: Any) -> str:
            nonlocal seq
            data = json.dumps({"type": kind, "sequence_number": seq, **payload}, ensure_ascii=False)
            seq += 1
            return f"event: {kind}\ndata: {data}\n\n"

        msg_id = _id("msg")
        order: list[tuple[str, int]] = []  # output items in the order they were opened: ("message", 0) / ("call", k)
        text: list[str] = []
        # The output text's logprobs (asked for with `include`): each delta carries its tokens' as OpenAI sends them;
        # tokens that came with no text yet (a stop string undecided, a character's first byte tokens) go with the next
        # delta, and what no delta took (the EOS's entry) with output_text.done; the whole list is the final part's.
        want_lps = req.wants_logprobs()
        lps: list[TokenLogprob] = []
        pending: list[TokenLogprob] = []
        calls: dict[int, dict[str, Any]] = {}
        call_ids: dict[int, str] = {}

        def open_message() -> list[str]:
            if ("message", 0) in order:
                return []
            order.append(("message", 0))
            oi = len(order) - 1
            return [ev("response.output_item.added", output_index=oi, item=_message_item(msg_id, "", "in_progress")),
                    ev("response.content_part.added", item_id=msg_id, output_index=oi, content_index=0,
                       part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

        def on_text(delta: str) -> list[str]:
            out = open_message()
            text.append(delta)
            piece = responses_logprobs(pending)
            pending.clear()
            return [*out, ev("response.output_text.delta", item_id=msg_id, output_index=order.index(("message", 0)),
                             content_index=0, delta=delta, logprobs=piece)]

        def on_calls(deltas: list[dict[str, Any]]) -> list[str]:
            out: list[str] = []
            for d in deltas:
                k = d.get("index", 0) if isinstance(d.get("index", 0), int) else 0
                before = calls.get(k, {}).get("function", {}).get("arguments", "")
                accumulate_tool_calls(calls, [d])
                if ("call", k) not in order:
                    order.append(("call", k))
                    call_ids[k] = _id("fc")
                    out.append(ev("response.output_item.added", output_index=len(order) - 1, item=_call_item(call_ids[k], calls[k], "in_progress")))
                piece = calls[k]["function"]["arguments"][len(before):]
                if piece:
                    out.append(ev("response.function_call_arguments.delta", item_id=call_ids[k], output_index=order.index(("call", k)), delta=piece))
            return out

        def failed(err: APIError) -> str:
            return ev("response.failed", response={**shell, "status": "failed", "error": {"code": err.code or "server_error", "message": err.message}})

        stream.ending = failed  # a stream cut by shutdown ends this way too, numbered after what was sent
        async with contextlib.aclosing(events):
            yield ev("response.created", response=shell)
            yield ev("response.in_progress", response=shell)
            async for item in events:
                if isinstance(item, APIError):
                    yield failed(item)
                    return
                if isinstance(item, StreamChunk):
                    if item.index != 0:
                        continue
                    if want_lps and item.logprobs:
                        lps.extend(item.logprobs)
                        pending.extend(item.logprobs)
                    for line in (on_text(item.text) if item.text else []) + (on_calls(item.tool_calls) if item.tool_calls else []):
                        yield line
                    continue
                res: RunResult = item
                cand = res.candidates[0]
                if res.streamed and want_lps and lps and not cand.meta.get("logprobs"):  # the streamed tokens' are the answer's
                    cand = replace(cand, meta={**cand.meta, "logprobs": lps})
                elif not res.streamed and want_lps:  # whole: its tokens' logprobs go with its one delta
                    pending[:] = cand.meta.get("logprobs") or []
                if not res.streamed:  # the final stage was not streamable: its answer comes whole
                    for line in (on_text(cand.text) if cand.text else []) + on_calls([{"index": j, **c} for j, c in enumerate(cand.meta.get("tool_calls") or [])]):
                        yield line
                if not order:  # an empty answer is still one (empty) message
                    for line in open_message():
                        yield line
                # Close every item in the order opened, with the final text (a structured answer may lose its fences).
                ids = [call_ids[k] for kind, k in order if kind == "call"]
                final_items = self._output(cand, msg_id, ids)
                by_id = {it["id"]: it for it in final_items}
                output = []
                for oi, (kind, k) in enumerate(order):
                    it = by_id.get(msg_id if kind == "message" else call_ids[k]) or _message_item(msg_id, "".join(text), "completed")
                    if kind == "message":
                        part = it["content"][0]
                        yield ev("response.output_text.done", item_id=msg_id, output_index=oi, content_index=0, text=part["text"], logprobs=part["logprobs"])
                        yield ev("response.content_part.done", item_id=msg_id, output_index=oi, content_index=0, part=part)
                    else:
                        yield ev("response.function_call_arguments.done", item_id=it["id"], output_index=oi, name=it["name"], arguments=it["arguments"])
                    yield ev("response.output_item.done", output_index=oi, item=it)
                    output.append(it)
                body = self._finish(req, shell, res, output)
                self._keep(req, rid, prep, cand, body)
                # OpenAI's terminal event for a cut answer is response.incomplete (its response: status incomplete)
                yield ev("response.incomplete" if body["status"] == "incomplete" else "response.completed", response=body)
