"""The bench result cache gives back what the backend gave: a cached answer must not differ from a fresh one."""

from __future__ import annotations

from archon_server.backends.base import ChatResult, Choice, TokenLogprob, Usage
from archon_server.bench.cache import result_from_json, result_to_json


def test_logprobs_round_trip_with_raw_bytes_and_an_echoed_first_token():
    lps = [
        TokenLogprob("Paris", None, None),  # an echoed prompt's first token: nothing predicts it
        TokenLogprob("", -0.5, [("", -0.5), ("x", -2.0)], bytes=[0xE6, 0x9D], top_bytes=[[0xE6, 0x9D], [120]]),
        TokenLogprob("東", -0.1, [("東", -0.1)], bytes=[0xB1], top_bytes=[[0xB1]]),
    ]
    res = ChatResult([Choice("Paris東", "stop", 0, lps)], Usage(3, 2), "m", 0.5, 1, {"k": 1.0})
    back = result_from_json(result_to_json(res))
    assert back.choices[0].logprobs == lps
    assert back.choices[0].text == "Paris東" and back.usage == res.usage
