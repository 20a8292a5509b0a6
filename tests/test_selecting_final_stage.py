"""A final stage that selects (ranker, scorer, vote, verifier) rather than writes: what the client's parameters do.

The writers it picks from get the client's writing parameters (they had been dropped without a word), `n` counts
the kept answers it returns (more than it can keep is a 400), and a stream finishes every choice it announces."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import fake_config
from test_fuzz import assert_openai_error

URL = "/v1/chat/completions"


@pytest.fixture
def up(upstream_factory):
    return upstream_factory()


@pytest.fixture
def srv(up, server_factory):
    return server_factory(fake_config(up.url))


def _client(srv):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def test_writing_parameters_reach_the_writers_a_ranker_picks_from(srv, up):
    r = _client(srv).chat.completions.create(
        model="best-of-n", messages=[{"role": "user", "content": "hi"}], max_tokens=7, temperature=0.1, stop=["\n\n"],
        logprobs=True, top_logprobs=2, seed=3, extra_body={"min_tokens": 2})
    gen = [b.body for b in up.requests if b.body.get("n") == 8]
    assert len(gen) == 1, [b.body for b in up.requests]  # the writers keep their own 8 samples (not the client's n=1)
    g = gen[0]
    assert (g["max_tokens"], g["stop"], g["logprobs"], g["top_logprobs"], g["min_tokens"]) == (7, ["\n\n"], True, 2, 2)
    assert g["temperature"] == 0.8  # best-of-n's own sampling (its seed derives from the client's)
    ranker = [b.body for b in up.requests if b.body is not g]
    assert ranker and all(b.get("max_tokens") != 7 and not b.get("logprobs") for b in ranker)  # the judge samples its own way
    assert len(r.choices) == 1


def test_n_returns_that_many_kept_answers_best_first(srv, up):
    r = _client(srv).chat.completions.create(model="best-of-n", messages=[{"role": "user", "content": "hi"}], n=3,
                                             extra_body={"architecture": {"layers": [[{"type": "generator", "model": "default", "samples": 8}],
                                                                                     [{"type": "ranker", "model": "judge", "top_k": 3}]]}})
    assert [c.message.content for c in r.choices] == [f"answer {i} from fake-model" for i in (7, 6, 5)]  # the fake ranks in reverse
    assert [c.index for c in r.choices] == [0, 1, 2]


@pytest.mark.parametrize("stream", [False, True])
def test_n_above_what_the_selector_keeps_is_a_400_before_any_call(srv, up, stream):
    body = {"model": "best-of-n", "messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": stream}
    err = assert_openai_error(httpx.post(srv.url + URL, json=body), 400)
    assert err["param"] == "n" and "ranker (top_k 1)" in err["message"] and "n <= 1" in err["message"], err
    assert up.requests == []


def test_a_stream_finishes_every_choice_it_announces_when_a_vote_keeps_fewer(upstream_factory, server_factory):
    """A vote keeps the answers that agree with the majority: 3 of 8 here, asked for 5. The stream announced 5 roles
    up front and finished 3 (a client waiting on choice 4 waited for ever); now it announces a choice with its answer."""
    up = upstream_factory(lambda b: {"text": [f"so \\boxed{{{1 if i < 3 else i}}}" for i in range(8)]} if b.get("n") == 8 else None)
    srv = server_factory(fake_config(up.url))
    events = []
    with httpx.stream("POST", srv.url + URL, json={"model": "self-consistency", "messages": [{"role": "user", "content": "1?"}], "n": 5, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    roles = {c["index"] for e in events for c in e["choices"] if c["delta"].get("role")}
    finished = {c["index"] for e in events for c in e["choices"] if c.get("finish_reason")}
    assert roles == finished == {0, 1, 2}


def test_response_format_reaches_the_writers_and_the_picked_answer_is_checked(upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": '{"a": 1}'} if b.get("n") == 8 else None)
    srv = server_factory(fake_config(up.url))
    r = _client(srv).chat.completions.create(model="best-of-n", messages=[{"role": "user", "content": "hi"}],
                                             response_format={"type": "json_object"})
    assert json.loads(r.choices[0].message.content) == {"a": 1}
    [g] = [b.body for b in up.requests if b.body.get("n") == 8]
    assert g["response_format"] == {"type": "json_object"}


def test_writers_before_a_selector_keep_their_own_sampling_and_distinct_seeds(srv, up):
    """Two writers of one model before a ranker: a client's temperature and seed must not make their samples the same
    (a selector needs varied answers to choose from); what the answer must be — its length — reaches both."""
    arch = {"layers": [[{"type": "generator", "model": "default", "samples": 2, "temperature": 0.9},
                        {"type": "generator", "model": "default", "samples": 2, "temperature": 0.9}],
                       [{"type": "ranker", "model": "judge", "top_k": 1}]]}
    _client(srv).chat.completions.create(model="best-of-n", messages=[{"role": "user", "content": "hi"}], temperature=0, seed=5,
                                         max_tokens=9, extra_body={"architecture": arch, "top_k": 3})
    gen = [b.body for b in up.requests if b.body.get("n") == 2]
    assert len(gen) == 2
    assert {g["temperature"] for g in gen} == {0.9} and all(g["max_tokens"] == 9 for g in gen)
    assert len({g["seed"] for g in gen}) == 2 and all("top_k" not in g for g in gen)  # seeds derived per component


@pytest.mark.parametrize("stream", [False, True])
def test_best_of_n_answers_with_text_when_its_first_sample_is_empty_and_the_ranking_unparseable(upstream_factory, server_factory, stream):
    """The ranker's fallback kept the incoming order, so an empty first sample became the answer (content "")."""
    up = upstream_factory(lambda b: {"text": ["", *[f"sample {i}" for i in range(1, 8)]]} if b.get("n") == 8 else {"text": "They are all good."})
    srv = server_factory(fake_config(up.url))
    kw = {"model": "best-of-n", "messages": [{"role": "user", "content": "hi"}], "extra_body": {"return_trace": True}}
    if stream:
        chunks = list(_client(srv).chat.completions.create(stream=True, **kw))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        trace = next(c.model_extra["trace"] for c in chunks if c.model_extra and c.model_extra.get("trace"))
    else:
        r = _client(srv).chat.completions.create(**kw)
        content, trace = r.choices[0].message.content, r.model_extra["trace"]
    assert content == "sample 1"
    assert trace["layers"][1]["kept"] == [1] and any("set aside" in n for n in trace["layers"][1]["notes"])
