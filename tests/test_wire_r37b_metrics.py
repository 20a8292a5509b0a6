"""/metrics: generation requests refused before they run (a 400 on a field, a 404 model) are counted in
archon_requests_total by status (they were counted nowhere); the engine's cumulative stats are counters."""

from __future__ import annotations

import httpx
from conftest import fake_config
from prometheus_client.parser import text_string_to_metric_families

Q = [{"role": "user", "content": "Q"}]


def test_validation_refusals_are_counted_by_status(upstream_factory, server_factory):
    srv = server_factory(fake_config(upstream_factory().url))
    for body in ({"model": "fake", "messages": Q, "temperature": 9}, {"model": "fake", "messages": Q, "n": 0},
                 {"model": "fake", "messages": Q, "stop": ["a", "b", "c", "d", "e"]}, {"model": "nope", "messages": Q}):
        r = httpx.post(srv.url + "/v1/chat/completions", json=body)
        assert r.status_code in (400, 404)
    assert httpx.post(srv.url + "/v1/responses", json={"model": "fake", "input": "Q", "temperature": 9}).status_code == 400
    assert httpx.post(srv.url + "/v1/chat/completions", json={"model": "fake", "messages": Q}).status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)}
    samples = {(s.labels["model"], s.labels["status"]): s.value for s in families["archon_requests"].samples if s.name == "archon_requests_total"}
    assert samples == {("", "400"): 4.0, ("", "404"): 1.0, ("fake", "200"): 1.0}
    assert "chat completions, completions, responses" in families["archon_requests"].documentation


def test_engine_counters_are_counters_and_the_rest_gauges():
    from archon_server.api.metrics import Metrics

    class Engine:
        def stats(self) -> dict:
            return {"requests": 7, "decode_tokens": 100, "cancelled": 1, "errors": 0, "prefills": 7, "prefix_hit_tokens": 96,
                    "active_sequences": 2, "queued": 0, "prefix_hit_rate": 0.5, "max_batch_seen": 4}

    families = {f.name: f for f in text_string_to_metric_families(Metrics(lambda: {"smollm2": Engine()}).exposition().decode())}
    for name in ("requests", "decode_tokens", "cancelled", "errors", "prefills", "prefix_hit_tokens"):
        fam = families[f"archon_backend_{name}"]
        assert fam.type == "counter" and fam.samples[0].name == f"archon_backend_{name}_total", (name, fam)
    for name in ("active_sequences", "queued", "prefix_hit_rate", "max_batch_seen"):
        assert families[f"archon_backend_{name}"].type == "gauge", name
