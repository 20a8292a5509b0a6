"""Fault matrix: every upstream fault the scripted upstream can inject, aimed at the calls of one component type at a
time.  The request either answers 200 with the failure recorded in its trace, or the right OpenAI error (502 for
failed/malformed backends, 504 for timeouts and deadlines) — always within its deadline.  Plus circuit breaking.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from archon_server.api.app import build_app
from archon_server.config import PRESET_ALIASES, ServerConfig
from archon_server.testing.server import ServerThread
from archon_server.testing.upstream import FakeUpstream
from conftest import ROOT

# Which prompt belongs to which component (the prompts are in components/prompts.py).
def component_of(body: dict[str, Any]) -> str:
    text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
    if "[] > []" in text:
        return "ranker"
    if "Strengths" in text and "Weaknesses" in text:
        return "critic"
    if "[Correct]" in text and "[Incorrect]" in text:
        return "verifier"
    if "Unit tests:" in text:
        return "unit_test_evaluator"
    if "Write " in text and "unit tests" in text:
        return "unit_test_generator"
    if "best synthesis so far" in text:
        return "self_moa_seq"
    if "synthesize" in text.lower():
        return "fuser"
    return "generator"


G = {"type": "generator", "model": "default", "samples": 3}
ARCHS: dict[str, list[list[dict[str, Any]]]] = {
    "generator": [[G]],
    "fuser": [[G], [{"type": "fuser", "model": "aggregator"}]],
    "ranker": [[G], [{"type": "ranker", "model": "judge", "top_k": 1}]],
    "critic": [[G], [{"type": "critic", "model": "judge"}], [{"type": "fuser", "model": "aggregator", "use_critiques": True}]],
    "verifier": [[G], [{"type": "verifier", "model": "judge"}]],
    "unit_tests": [[G], [{"type": "unit_test_generator", "model": "judge", "num_tests": 3}],
                   [{"type": "unit_test_evaluator", "model": "judge", "top_k": 1}]],
    "self_moa_seq": [[{"type": "self_moa_seq", "model": "aggregator", "proposer": "default", "samples": 6, "window": 3}]],
}
# The component types whose prompts get the fault, per architecture.
TARGETS = {"unit_tests": {"unit_test_generator", "unit_test_evaluator"}}
# Where a failure degrades (recorded, the request answers 200: self_moa_seq keeps its best synthesis so far) rather
# than failing the request. Every other component here is alone in its layer, so when all its calls fail the layer
# has nothing to pass on and the request fails with 502/504 (partial failures inside a layer: test_server.py).
DEGRADES = {"self_moa_seq"}

ERROR_FAULTS = ["500", "502", "503", "429", "400", "reset", "invalid_json", "wrong_n"]
TIMEOUT_FAULTS = ["timeout"]  # upstream slower than read_timeout_s
STREAM_FAULTS = ["truncated", "stream_error", "drip"]  # only a streamed (final-stage) call sees these

READ_TIMEOUT_S = 0.5
DEADLINE_S = 1.5  # of the second server, whose backend read timeout is longer: the request deadline fires first


class Faults:
    """The upstream's script: the current fault, and for which component types."""

    def __init__(self) -> None:
        self.fault: str | None = None
        self.targets: set[str] = set()
        self.hits: list[str] = []

    def __call__(self, body: dict[str, Any]) -> dict[str, Any] | None:
        comp = component_of(body)
        if self.fault and comp in self.targets:
            self.hits.append(comp)
            act: dict[str, Any] = {"fault": self.fault, "timeout_s": 30}
            if self.fault == "drip":  # 40 words at 0.1 s: 4 s of stream, past the 1.5 s deadline
                act.update(text=" ".join(f"w{i}" for i in range(40)), drip_s=0.1)
            if self.fault in ("truncated", "stream_error"):
                act["text"] = "one two three four five six"
            return act
        return None


def _config(url: str, *, read_timeout_s: float, request_timeout_s: float) -> ServerConfig:
    return ServerConfig.model_validate({
        "backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [url], "aliases": PRESET_ALIASES,
                      "max_retries": 1, "read_timeout_s": read_timeout_s, "connect_timeout_s": 2,
                      "breaker_failures": 10_000}],  # the matrix is not about the breaker (tested below)
        "architectures_dirs": [str(ROOT / "architectures")],
        "server": {"request_timeout_s": request_timeout_s},
    })


@pytest.fixture(scope="module")
def rig() -> Iterator[dict[str, Any]]:
    faults = Faults()
    up = FakeUpstream(faults).start()
    fast = ServerThread(build_app(_config(up.url, read_timeout_s=READ_TIMEOUT_S, request_timeout_s=10))).start()
    slow = ServerThread(build_app(_config(up.url, read_timeout_s=30, request_timeout_s=DEADLINE_S))).start()
    yield {"faults": faults, "up": up, "fast": fast, "deadline": slow}
    fast.stop()
    slow.stop()
    up.stop()


def _ask(server: ServerThread, layers: list[list[dict[str, Any]]], stream: bool = False) -> tuple[int, dict[str, Any], float]:
    """POST and return (status, body-or-final-event, seconds). A stream's error event counts as its status."""
    body = {"model": "self-moa", "messages": [{"role": "user", "content": "Q"}], "architecture": {"layers": layers},
            "return_trace": True, "stream": stream}
    t0 = time.perf_counter()
    with httpx.Client(timeout=30) as h:
        r = h.post(server.url + "/v1/chat/completions", json=body)
        elapsed = time.perf_counter() - t0
        if not stream or r.status_code != 200:
            return r.status_code, r.json(), elapsed
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]  # a stream always ends cleanly
    for ev in events:
        if "error" in ev:
            status = {"upstream_error": 502, "timeout_error": 504}[ev["error"]["type"]]
            return status, ev, elapsed
    text = "".join(c["delta"].get("content") or "" for ev in events for c in ev.get("choices", []))
    last = next((ev for ev in reversed(events) if ev.get("trace")), {})
    return 200, {"text": text, "trace": last.get("trace")}, elapsed


def _failed_calls(trace: dict[str, Any], targets: set[str]) -> list[dict[str, Any]]:
    return [c for layer in trace["layers"] for c in layer["calls"] if not c["ok"] and c["type"] in targets]


def _check(status: int, body: dict[str, Any], arch: str, expected_error: int) -> None:
    targets = TARGETS.get(arch, {arch})
    if arch in DEGRADES:
        assert status == 200, body
        failed = _failed_calls(body["trace"], targets)
        assert failed and all(c["error"] for c in failed), body["trace"]  # the failure is in the trace
    else:
        assert status == expected_error, body
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


@pytest.mark.parametrize("fault", ERROR_FAULTS + TIMEOUT_FAULTS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fault_matrix(rig, arch, fault):
    faults: Faults = rig["faults"]
    faults.fault, faults.targets, faults.hits = fault, TARGETS.get(arch, {arch}), []
    try:
        status, body, elapsed = _ask(rig["fast"], ARCHS[arch])
    finally:
        faults.fault = None
    assert faults.hits, "the fault was never injected"
    # A layer whose every call the upstream refused as invalid (400) is the request's 400: retrying cannot help
    _check(status, body, arch, 504 if fault in TIMEOUT_FAULTS else 400 if fault == "400" else 502)
    # Within the deadline: one retry of a read timeout of 0.5 s plus backoff stays far below 10 s.
    assert elapsed < 8, elapsed
    if arch == "generator":
        # 400 is final; 5xx, 429, resets, malformed bodies and timeouts are retried once (max_retries=1).
        assert len(faults.hits) == (1 if fault == "400" else 2), faults.hits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_backend_that_hangs_forever_hits_the_deadline(rig, arch):
    faults: Faults = rig["faults"]
    faults.fault, faults.targets, faults.hits = "hang", TARGETS.get(arch, {arch}), []
    n_before = len(rig["up"].requests)
    try:
        status, body, elapsed = _ask(rig["deadline"], ARCHS[arch])
    finally:
        faults.fault = None
    assert faults.hits
    assert status == 504 and body["error"]["type"] == "timeout_error", body
    assert DEADLINE_S - 0.1 < elapsed < DEADLINE_S + 3, elapsed
    # ...and the hanging upstream calls were aborted, not left running.
    hung = [q for q in rig["up"].requests[n_before:] if q.ended is None or q.aborted]
    deadline = time.time() + 30  # (a loaded machine may take seconds to get there; done at once when it is)
    while time.time() < deadline and not all(q.aborted for q in hung):
        time.sleep(0.05)
    assert hung and all(q.aborted for q in hung)


@pytest.mark.parametrize("fault", STREAM_FAULTS)
@pytest.mark.parametrize("arch", ["generator", "fuser"])
def test_stream_faults_in_the_final_stage(rig, arch, fault):
    faults: Faults = rig["faults"]
    faults.fault, faults.targets, faults.hits = fault, {arch}, []
    server = rig["deadline"] if fault == "drip" else rig["fast"]
    try:
        status, body, elapsed = _ask(server, ARCHS[arch], stream=True)
    finally:
        faults.fault = None
    assert faults.hits
    # Text was already sent to the client: no retry (it would duplicate text), an error event instead.
    assert status == (504 if fault == "drip" else 502), body
    assert len(faults.hits) == 1
    assert elapsed < DEADLINE_S + 3 if fault == "drip" else elapsed < 8


def test_faults_off_everything_answers(rig):
    """Control for the matrix: with no fault, every architecture answers 200 with no failed call."""
    for arch, layers in ARCHS.items():
        status, body, _ = _ask(rig["fast"], layers)
        assert status == 200, (arch, body)
        assert not _failed_calls(body["trace"], {"generator", "fuser", "ranker", "critic", "verifier", "unit_test_generator",
                                                 "unit_test_evaluator", "self_moa_seq"}), (arch, body["trace"])


# -- circuit breaker ----------------------------------------------------------------------------------------------------


def test_circuit_breaker_skips_a_failing_replica_then_lets_it_back(upstream_factory, server_factory):
    # The cool-down must outlast each phase of sequential requests, also on a loaded machine (at 1 s, the 12
    # requests of the first phase outlived it under load and the breaker let a probe through early).
    COOLDOWN = 5.0
    state = {"bad_fails": True}
    bad = upstream_factory(lambda b: {"fault": "500"} if state["bad_fails"] else None)
    good = upstream_factory()
    cfg = ServerConfig.model_validate({
        "backends": [{"alias": "fake", "kind": "openai", "model": "m", "urls": [bad.url, good.url],  # bad first: picked on ties
                      "max_retries": 1, "breaker_failures": 3, "breaker_cooldown_s": COOLDOWN, "read_timeout_s": 5}],
        "architectures_dirs": [],
        "server": {"request_timeout_s": 10},
    })
    srv = server_factory(cfg)

    def ask() -> int:
        return httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                          json={"model": "fake", "messages": [{"role": "user", "content": "Q"}]}).status_code

    statuses = [ask() for _ in range(12)]
    # Sequential requests tie on outstanding=0, so the bad replica is tried until its breaker opens after exactly
    # 3 failures; from then on only the healthy replica gets traffic and every request succeeds.
    assert len(bad.requests) == 3, len(bad.requests)
    assert statuses[0] == 502 and all(s == 200 for s in statuses[1:]), statuses
    assert len(good.requests) == 11

    # Cool-down over, replica still failing: one probe, re-opened at once (no 3 more failures).
    time.sleep(COOLDOWN + 0.3)
    assert [ask() for _ in range(5)] == [200] * 5
    assert len(bad.requests) == 4

    # Cool-down over and the replica recovered: the probe succeeds, the breaker closes, traffic comes back to it.
    state["bad_fails"] = False
    time.sleep(COOLDOWN + 0.3)
    assert [ask() for _ in range(6)] == [200] * 6
    assert len(bad.requests) == 10  # ties go to the first replica again: all 6 went there


def test_client_errors_do_not_open_the_breaker(upstream_factory, server_factory):
    """A 400 (a prompt past the context, a parameter the model refuses) is the replica answering: three in a row had
    opened the breaker of a healthy replica, and its traffic went elsewhere for the cool-down."""
    script = lambda b: {"fault": "400"} if "too long" in json.dumps(b) else None  # noqa: E731
    first, second = upstream_factory(script), upstream_factory(script)
    cfg = ServerConfig.model_validate({
        "backends": [{"alias": "fake", "kind": "openai", "model": "m", "urls": [first.url, second.url], "max_retries": 1,
                      "breaker_failures": 3, "breaker_cooldown_s": 60, "read_timeout_s": 5}],
        "architectures_dirs": [],
        "server": {"request_timeout_s": 10},
    })
    srv = server_factory(cfg)

    def ask(text: str) -> int:
        return httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                          json={"model": "fake", "messages": [{"role": "user", "content": text}]}).status_code

    assert [ask("too long") for _ in range(5)] == [400] * 5  # each sent once: a 400 is not retried
    assert [ask("fine") for _ in range(3)] == [200] * 3
    # Sequential requests tie on outstanding=0 and ties go to the first replica: it was never taken out.
    assert len(first.requests) == 8 and not second.requests
