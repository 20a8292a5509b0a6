"""Each component type through the graph runtime over a real upstream HTTP server (scripted answers)."""

from __future__ import annotations

import json

import pytest

from archon_server.backends.base import SamplingParams
from archon_server.backends.registry import build_registry
from archon_server.components import FinalOverrides
from archon_server.graph.runtime import GraphError, GraphRuntime
from archon_server.spec import parse_architecture
from conftest import fake_config


async def run(up, layers, prompt="Q", **arch):
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        spec = parse_architecture({"name": "t", "layers": layers, **arch})
        return await GraphRuntime(reg).run(spec, [{"role": "user", "content": prompt}])
    finally:
        await reg.close()


def texts(n):
    return [f"candidate {i}" for i in range(n)]


async def test_archon_recipe_rank_critic_fuse(upstream_factory):
    up = upstream_factory(lambda b: {"text": texts(b["n"])} if "[] > []" not in json.dumps(b) and "Strengths" not in json.dumps(b) and "synthesize" not in json.dumps(b) else None)
    res = await run(up, [
        [{"type": "generator", "model": "proposer-1", "samples": 4}],
        [{"type": "ranker", "model": "judge", "top_k": 2}],
        [{"type": "critic", "model": "judge"}],
        [{"type": "fuser", "model": "aggregator"}],
    ])
    assert res.text == "fused answer from 2 responses"
    fuse_prompt = up.requests[-1].body["messages"][0]["content"]
    # the fake ranker reverses the order: the top 2 are candidates 3 and 2, with their critiques attached
    assert fuse_prompt.index("candidate 3") < fuse_prompt.index("candidate 2") and "Strengths" in fuse_prompt
    assert "candidate 0" not in fuse_prompt
    assert [layer.candidates_out for layer in res.trace.layers] == [4, 2, 2, 1]


async def test_ranker_unparseable_retries_once_then_keeps_order(upstream_factory):
    up = upstream_factory(lambda b: {"text": "I like them all"} if "[] > []" in json.dumps(b) else {"text": texts(b["n"])})
    res = await run(up, [[{"type": "generator", "model": "default", "samples": 3}], [{"type": "ranker", "model": "judge", "top_k": 1}]])
    assert res.text == "candidate 0"
    notes = res.trace.layers[1].notes
    assert any("after retry" in n for n in notes) and any("kept the incoming order" in n for n in notes)
    assert len(res.trace.layers[1].calls) == 2


async def test_verifier_keeps_passing_and_fails_closed(upstream_factory):
    def script(b):
        s = json.dumps(b)
        if "[Incorrect]" in s:  # verifier prompt
            return {"text": "[Correct]" if "candidate 1" in s else ("no verdict" if "candidate 2" in s else "[Incorrect]")}
        return {"text": texts(b["n"])}

    up = upstream_factory(script)
    res = await run(up, [[{"type": "generator", "model": "default", "samples": 3}], [{"type": "verifier", "model": "judge"}]])
    assert res.choices == ["candidate 1"]
    up2 = upstream_factory(lambda b: {"text": "[Incorrect]"} if "[Incorrect]" in json.dumps(b) else {"text": texts(b["n"])})
    res = await run(up2, [[{"type": "generator", "model": "default", "samples": 2}], [{"type": "verifier", "model": "judge"}]], final="first")
    assert res.text == "candidate 0" and any("no candidate passed" in n for n in res.trace.layers[1].notes)


async def test_unit_tests_generated_then_evaluated(upstream_factory):
    def script(b):
        s = json.dumps(b)
        if "Write 3 unit tests" in s:
            return {"text": "- t1\n- t2\n- t3"}
        if "[Passed]" in s:
            return {"text": "Test 1: [Passed]\nTest 2: [Passed]\nTest 3: [Failed]" if "candidate 1" in s else "Test 1: [Failed]"}
        return {"text": texts(b["n"])}

    up = upstream_factory(script)
    res = await run(up, [
        [{"type": "generator", "model": "default", "samples": 3}, {"type": "unit_test_generator", "model": "judge", "num_tests": 3}],
        [{"type": "unit_test_evaluator", "model": "judge", "top_k": 1}],
    ])
    assert res.text == "candidate 1"
    assert res.candidates[0].score == pytest.approx(2 / 3)


async def test_vote_self_consistency(upstream_factory):
    up = upstream_factory(lambda b: {"text": [r"so \boxed{4}", r"\boxed{5}", r"thus \boxed{4}.", "no idea"]})
    res = await run(up, [[{"type": "generator", "model": "default", "samples": 4}], [{"type": "vote", "extractor": {"kind": "boxed"}}]])
    assert res.text == r"so \boxed{4}" and res.candidates[0].score == 2.0
    assert res.trace.calls == 1


async def test_self_moa_seq_windows_and_consumption(upstream_factory):
    def script(b):
        s = json.dumps(b)
        if "best synthesis so far" in s:
            k = s.count("candidate") + s.count("synth")
            return {"text": f"synth over {k}"}
        return {"text": [f"candidate {i}" for i in range(b["n"])], "latency": 0.05}

    up = upstream_factory(script)
    res = await run(up, [[{"type": "self_moa_seq", "model": "aggregator", "proposer": "default", "samples": 11, "window": 4, "repeat_best": 1}]])
    gens = [q.body["n"] for q in up.requests if "best synthesis" not in json.dumps(q.body)]
    assert gens == [4, 3, 3, 1]  # one n=k request per window's worth of fresh samples
    aggs = [q for q in up.requests if "best synthesis" in json.dumps(q.body)]
    assert len(aggs) == 4
    # every window after the first carries the previous synthesis
    assert all("synth over" in json.dumps(a.body) for a in aggs[1:])
    assert res.text.startswith("synth over")


async def test_min_success_and_unknown_alias(upstream_factory):
    n = {"i": 0}

    def script(b):
        n["i"] += 1
        return {"fault": "500"} if n["i"] % 2 == 0 else None

    up = upstream_factory(script)
    with pytest.raises(GraphError) as e:
        await run(up, [[{"type": "generator", "models": ["proposer-1", "proposer-2", "proposer-3", "proposer-4"]}], [{"type": "fuser", "model": "aggregator"}]], min_success=4)
    assert e.value.status == 502 and "min_success" in str(e.value)
    with pytest.raises(GraphError) as e:
        await run(up, [[{"type": "generator", "model": "nobody"}]])
    assert e.value.status == 400


async def test_final_overrides_reach_the_final_stage_only(upstream_factory):
    up = upstream_factory()
    reg = build_registry(fake_config(up.url))
    await reg.start()
    spec = parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "default", "samples": 2}], [{"type": "fuser", "model": "aggregator"}]]})
    res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": "Q"}], final=FinalOverrides(n=3, max_tokens=9, temperature=0.2))
    await reg.close()
    assert len(res.choices) == 3 and up.requests[-1].body["max_tokens"] == 9 and up.requests[0].body["max_tokens"] == 512


async def test_the_final_stage_gets_only_the_overrides_given(upstream_factory):
    """run(spec, messages, SamplingParams(n=2)) made a full FinalOverrides of the SamplingParams: its defaults
    (temperature 0.7, top_p 1.0, max_tokens 512) went over the final stage's own values, as the sweeps and `archon run`
    no longer do. run() takes final-stage overrides one way, final=FinalOverrides(...), with only the fields set."""
    up = upstream_factory()
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        spec = parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "default", "temperature": 0.1, "top_p": 0.5, "max_tokens": 33}]]})
        msgs = [{"role": "user", "content": "Q"}]
        with pytest.raises(TypeError):
            await GraphRuntime(reg).run(spec, msgs, SamplingParams(n=2))  # type: ignore[misc]
        res = await GraphRuntime(reg).run(spec, msgs, final=FinalOverrides(n=2))
        body = up.requests[-1].body
        assert len(res.choices) == 2 and (body["temperature"], body["top_p"], body["max_tokens"]) == (0.1, 0.5, 33)
    finally:
        await reg.close()


async def test_executed_unit_test_evaluator_runs_code_in_the_sandbox(upstream_factory):
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    hostile = "```python\nimport os\nos.system('touch /tmp/pwned')\ndef add(a, b):\n    while True: pass\n```"

    def script(b):
        s = json.dumps(b)
        if "single-line Python assert" in s:
            return {"text": "- assert add(1, 2) == 3\n- assert add(0, 0) == 0\n- the function is fast"}
        return {"text": [bad, hostile, good][: b["n"]]}

    up = upstream_factory(script)
    res = await run(up, [
        [{"type": "generator", "model": "default", "samples": 3},
         {"type": "unit_test_generator", "model": "judge", "num_tests": 3, "style": "assert"}],
        [{"type": "unit_test_evaluator", "mode": "executed", "top_k": 1}],
    ], prompt="Write add(a, b).")
    assert res.text == good and res.candidates[0].score == 1.0
    assert any("not Python" in n for n in res.trace.layers[1].notes)


async def test_failures_are_classified_by_exception_type_not_text(upstream_factory):
    """A 400 whose message says "timeout" is a refused call (400), not a timeout (504); a 500 saying so is a failed call
    (502); the record carries the status."""
    up = upstream_factory(lambda b: {"fault": "400", "message": "invalid value for `timeout`: request timed out"})
    with pytest.raises(GraphError) as e:
        await run(up, [[{"type": "generator", "model": "default"}]])
    assert e.value.status == 400
    calls = e.value.trace.layers[0].calls
    assert [(c.ok, c.status, c.component, c.type) for c in calls] == [(False, "invalid", "generator0", "generator")]
    up = upstream_factory(lambda b: {"fault": "500", "message": "request timed out"})
    with pytest.raises(GraphError) as e:
        await run(up, [[{"type": "generator", "model": "default"}]])
    assert e.value.status == 502
    assert [c.status for c in e.value.trace.layers[0].calls] == ["error"]


async def test_a_layer_whose_calls_were_all_refused_is_a_400_unless_another_failed_otherwise(upstream_factory):
    """Every call refused as invalid (a prompt past the context): 400, which clients do not retry; one of them failing
    some other way makes it the layer's 502."""
    up = upstream_factory(lambda b: {"fault": "400", "message": "prompt is longer than the model's context"})
    with pytest.raises(GraphError) as e:
        await run(up, [[{"type": "generator", "model": "default"}, {"type": "generator", "model": "default"}]])
    assert e.value.status == 400 and "longer than the model's context" in str(e.value)
    mixed = iter([{"fault": "400"}, {"fault": "500"}, {"fault": "500"}, {"fault": "500"}])
    up = upstream_factory(lambda b: next(mixed))
    with pytest.raises(GraphError) as e:
        await run(up, [[{"type": "generator", "model": "default"}, {"type": "generator", "model": "default"}]])
    assert e.value.status == 502


async def test_a_call_cancelled_while_queued_for_a_slot_is_never_created():
    """A client that goes away while its call waits for a backend slot, or before the call's task first ran
    (gather's tasks, cancelled at once): no call coroutine is ever created, so none is left unawaited
    (Python's 'coroutine ... was never awaited', seen in the soak for both cases)."""
    import asyncio

    from archon_server.components.base import _limited

    made = []

    async def call() -> int:
        return 1

    def start():  # type: ignore[no-untyped-def]
        made.append(1)
        return call()

    limit = asyncio.Semaphore(0)  # no slot free: the call queues
    task = asyncio.ensure_future(_limited(limit, start))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert limit._value == 0  # nothing released that was never acquired
    free = asyncio.Semaphore(4)
    outer = asyncio.ensure_future(asyncio.gather(*(_limited(free, start) for _ in range(3))))
    outer.cancel()  # before any of gather's tasks ran
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert made == [] and free._value == 4
    assert await _limited(free, start) == 1 and made == [1]


# -- an empty candidate is never the answer while another one has text (graph/runtime.py: set_aside_empty) ----------
WITH_EMPTY = ["", "  \n", "candidate 2", "candidate 3"]


def empty_first(judge):  # type: ignore[no-untyped-def]
    """Samples whose first two are empty (a sample that stopped at once); ``judge(body_text)`` answers the judge."""
    def script(b):  # type: ignore[no-untyped-def]
        s = json.dumps(b)
        if "candidate 2" in s or "candidate 3" in s:  # a judge's prompt quotes the candidates
            return judge(s)
        return {"text": WITH_EMPTY[: b["n"]]}
    return script


async def test_unparseable_ranking_keeps_the_incoming_order_of_the_candidates_with_an_answer(upstream_factory):
    up = upstream_factory(empty_first(lambda s: {"text": "I like them all"}))
    res = await run(up, [[{"type": "generator", "model": "default", "samples": 4}], [{"type": "ranker", "model": "judge", "top_k": 1}]])
    assert res.text == "candidate 2"
    notes = res.trace.layers[1].notes
    assert any("2 empty candidate(s) of 4 set aside" in n for n in notes) and any("kept the incoming order" in n for n in notes)
    assert res.trace.layers[1].kept == [2] and res.trace.layers[1].candidates_in == 4
    judge_prompt = up.requests[-1].body["messages"][0]["content"]
    assert "provide you with 2 responses" in judge_prompt  # the judge never saw the empty ones


async def test_a_ranker_cannot_pick_an_empty_candidate(upstream_factory):
    up = upstream_factory(empty_first(lambda s: {"text": "[1] > [2] > [3] > [4]"}))
    res = await run(up, [[{"type": "generator", "model": "default", "samples": 4}], [{"type": "ranker", "model": "judge", "top_k": 1}]])
    assert res.text == "candidate 2"


async def test_a_verifier_that_passes_none_keeps_those_with_an_answer(upstream_factory):
    up = upstream_factory(empty_first(lambda s: {"text": "[Incorrect]"}))
    for final in ("top_ranked", "first"):
        res = await run(up, [[{"type": "generator", "model": "default", "samples": 4}], [{"type": "verifier", "model": "judge"}]], final=final)
        assert res.text == "candidate 2" and res.choices == ["candidate 2"]
        assert any("no candidate passed" in n for n in res.trace.layers[1].notes)


async def test_a_vote_that_extracts_nothing_keeps_those_with_an_answer(upstream_factory):
    up = upstream_factory(lambda b: {"text": WITH_EMPTY[: b["n"]]})
    res = await run(up, [[{"type": "generator", "model": "default", "samples": 4}], [{"type": "vote", "extractor": {"kind": "boxed"}}]])
    assert res.text == "candidate 2"


async def test_unit_test_evaluator_ties_and_a_critic_see_only_candidates_with_an_answer(upstream_factory):
    def judge(s):  # type: ignore[no-untyped-def]
        if "Write 2 unit tests" in s:
            return {"text": "- t1\n- t2"}
        return {"text": "Test 1: [Failed]\nTest 2: [Failed]"} if "[Passed]" in s else None

    def script(b):  # type: ignore[no-untyped-def]
        s = json.dumps(b)
        return judge(s) if ("Write 2 unit tests" in s or "[Passed]" in s) else (None if "candidate 2" in s else {"text": WITH_EMPTY[: b["n"]]})

    up = upstream_factory(script)
    res = await run(up, [
        [{"type": "generator", "model": "default", "samples": 4}, {"type": "unit_test_generator", "model": "judge", "num_tests": 2}],
        [{"type": "unit_test_evaluator", "model": "judge", "top_k": 1}],
    ])
    assert res.text == "candidate 2" and res.candidates[0].score == 0.0
    up = upstream_factory(empty_first(lambda s: None))
    res = await run(up, [[{"type": "generator", "model": "default", "samples": 4}], [{"type": "critic", "model": "judge"}],
                         [{"type": "fuser", "model": "aggregator"}]])
    assert res.text == "fused answer from 2 responses"


async def test_the_final_rule_prefers_a_candidate_with_an_answer_and_all_empty_stays_empty(upstream_factory):
    """A final stage of two writers whose first one wrote nothing: the second one's answer, under either rule."""
    answers = {"A": "", "B": "second"}
    up = upstream_factory(lambda b: {"text": answers[b["messages"][0]["content"]]})
    layers = [[{"type": "generator", "model": "proposer-1", "system_prompt": "A"}, {"type": "generator", "model": "proposer-2", "system_prompt": "B"}]]
    for final in ("top_ranked", "first"):
        res = await run(up, layers, final=final)
        assert res.choices == ["second"]
    answers["B"] = " "
    res = await run(up, layers)
    assert res.choices == [""]  # every candidate empty: nothing better to give (and nothing set aside or invented)


async def test_self_moa_seq_an_empty_synthesis_does_not_replace_the_best_so_far(upstream_factory):
    """The last window's aggregation came back empty: it became the answer, and the synthesis it replaced was lost."""
    rounds = {"i": 0}

    def script(b):  # type: ignore[no-untyped-def]
        if "best synthesis so far" in json.dumps(b):
            rounds["i"] += 1
            return {"text": "synth 1" if rounds["i"] == 1 else ""}
        return {"text": [f"candidate {i}" for i in range(b["n"])], "latency": 0.02 * b["n"]}

    up = upstream_factory(script)
    res = await run(up, [[{"type": "self_moa_seq", "model": "aggregator", "proposer": "default", "samples": 10, "window": 4, "repeat_best": 1}]])
    assert rounds["i"] == 3 and res.text == "synth 1"
    assert any("empty synthesis" in n for n in res.trace.layers[0].notes)
    rounds["i"] = 1  # every aggregation empty: the answer is a sample, not an empty text
    res = await run(up, [[{"type": "self_moa_seq", "model": "aggregator", "proposer": "default", "samples": 4, "window": 4}]])
    assert res.text.startswith("candidate ")


async def test_a_generators_system_prompt_keeps_the_clients_system_message(upstream_factory):
    """self-consistency's generator has a system prompt (the \\boxed{} instruction): the client's own system message was
    dropped without a word ("Answer like a pirate" never reached the model). Now it comes first, as a fuser keeps it."""
    up = upstream_factory(lambda b: {"text": r"\boxed{4}"})
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        spec = parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "default", "samples": 2, "system_prompt": "Put it in \\boxed{}."}],
                                                           [{"type": "vote", "extractor": {"kind": "boxed"}}]]})
        msgs = [{"role": "system", "content": "Answer like a pirate."}, {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
        await GraphRuntime(reg).run(spec, msgs)
        sent = up.requests[-1].body["messages"]
        assert sent == [{"role": "system", "content": "Answer like a pirate.\nBe brief.\n\nPut it in \\boxed{}."}, {"role": "user", "content": "2+2?"}]
        await GraphRuntime(reg).run(spec, msgs[2:])
        assert up.requests[-1].body["messages"][0] == {"role": "system", "content": "Put it in \\boxed{}."}
    finally:
        await reg.close()


async def test_a_fusers_prompt_keeps_the_clients_system_message_as_a_generators_does(upstream_factory):
    """The fuser and a generator with a system prompt merge the client's system and developer messages one way
    (components/generator.py with_system): they come first, then the component's own instructions."""
    from archon_server.components import prompts

    up = upstream_factory()
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        spec = parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "default", "samples": 2}], [{"type": "fuser", "model": "aggregator"}]]})
        msgs = [{"role": "system", "content": "Answer like a pirate."}, {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
        await GraphRuntime(reg).run(spec, msgs)
        sent = up.requests[-1].body["messages"]
        assert [m["role"] for m in sent] == ["system", "user"] and sent[1] == {"role": "user", "content": "2+2?"}
        assert sent[0]["content"].startswith("Answer like a pirate.\nBe brief.\n\n" + prompts.FUSER_SYSTEM + "\n1. ")
        await GraphRuntime(reg).run(spec, msgs[2:])
        assert up.requests[-1].body["messages"][0]["content"].startswith(prompts.FUSER_SYSTEM + "\n1. ")
    finally:
        await reg.close()


async def test_a_final_self_moa_seq_writes_the_clients_n_in_its_last_window(upstream_factory):
    """n=2 on self-moa-seq returned one choice without a word; now the last window's aggregation is one n=2 request."""
    def script(b):  # type: ignore[no-untyped-def]
        if "best synthesis so far" in json.dumps(b):
            return {"text": [f"synth {i}" for i in range(b.get("n") or 1)]}
        return {"text": [f"candidate {i}" for i in range(b["n"])], "latency": 0.02 * b["n"]}

    up = upstream_factory(script)
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        spec = parse_architecture({"name": "t", "layers": [[{"type": "self_moa_seq", "model": "aggregator", "proposer": "default", "samples": 10, "window": 4}]]})
        res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": "Q"}], final=FinalOverrides(n=2))
        assert res.choices == ["synth 0", "synth 1"]
        assert [r.body.get("n", 1) for r in up.requests if "best synthesis so far" in json.dumps(r.body)] == [1, 1, 2]
    finally:
        await reg.close()


async def test_a_final_self_moa_seq_writes_the_clients_n_when_a_failed_chunk_arrives_last(upstream_factory):
    """A proposer chunk that failed after the others: the window of the last good samples ran with n=1 (being the last
    was known only when the queue ended) and the answer had one choice for n=2. Now that window is aggregated again
    with the client's n."""
    seen = {"n3": 0}

    def script(b):  # type: ignore[no-untyped-def]
        if "best synthesis so far" in json.dumps(b):
            return {"text": [f"synth {i}" for i in range(b.get("n") or 1)]}
        if b["n"] == 3:
            seen["n3"] += 1
            if seen["n3"] == 1:  # the first n=3 chunk is refused, after the others came
                return {"fault": "400", "latency": 0.4}
        return {"text": [f"candidate {i}" for i in range(b["n"])], "latency": 0.02 * b["n"]}

    up = upstream_factory(script)
    reg = build_registry(fake_config(up.url))
    await reg.start()
    try:
        spec = parse_architecture({"name": "t", "layers": [[{"type": "self_moa_seq", "model": "aggregator", "proposer": "default", "samples": 10, "window": 4}]]})
        res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": "Q"}], final=FinalOverrides(n=2))
        assert res.choices == ["synth 0", "synth 1"]
        ns = [r.body.get("n", 1) for r in up.requests if "best synthesis so far" in json.dumps(r.body)]
        assert ns[-1] == 2 and ns.count(2) == 1  # the last window's aggregation (whenever the failure came) is n=2
    finally:
        await reg.close()
