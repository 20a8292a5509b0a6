"""The embedded engine's KV-cache budget through the wire (`archon serve` with a local backend's `kv_cache_mb`, the
official openai SDK): a request whose KV cache could not fit the budget even alone is a 400 naming the option, and
the server goes on; one that fits alone but not beside a running stream waits for the stream and then answers, the
stream untouched; `/metrics` shows the budget and counts the wait. Why a budget: on Linux an allocation past the
machine's memory is not refused, the kernel kills the server, every request in it, once the pages are touched."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import openai
import pytest

from archon_server.testing.server import serve_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2 in float32: 30 layers x 3 K/V heads x 64 dims x K and V x 4 bytes = 46,080 bytes a position of a sequence,
# so 60 MB hold 1,365 positions: one sequence of a ~1,000-token prompt, not two (nor four of it).
CONFIG = "backends:\n  - alias: smollm2\n    kind: local\n    options: {dtype: float32, kv_cache_mb: 60}\n"
DOC = [{"role": "user", "content": "Which river comes last? " + " ".join(f"Line {i}: the fox crossed river {i}." for i in range(90))}]


def test_a_request_past_the_kv_budget_is_a_400_and_one_that_fits_alone_waits_for_room(tmp_path: Path):
    (tmp_path / "c.yaml").write_text(CONFIG)
    with serve_process(["serve", "-c", str(tmp_path / "c.yaml")], log=tmp_path / "serve.log", cwd=str(ROOT)) as (_proc, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="smollm2", messages=DOC, n=4, max_tokens=8)
        assert refused.value.status_code == 400 and "kv_cache_mb" in refused.value.message and "n=4 sequences" in refused.value.message

        stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Count to fifty."}],
                                                max_tokens=200, temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)  # the stream's row is decoding
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(client.chat.completions.create, model="smollm2", messages=DOC, max_tokens=8, temperature=0)
            rest = list(chunks)
            answer = long.result(timeout=300)
        assert rest[-1].usage.completion_tokens == 200  # the stream went on to its end
        assert 640 < answer.usage.prompt_tokens < 1343 and answer.choices[0].message.content  # 1 x 1,024 (or 1,344) fits
        metrics = httpx.get(url + "/metrics").text
        assert 'archon_backend_kv_waits_total{backend="smollm2"} 1.0' in metrics
        assert 'archon_backend_cache_budget_bytes{backend="smollm2"} 6.291456e+07' in metrics  # 60 MB
        assert 'archon_backend_errors_total{backend="smollm2"} 0.0' in metrics
