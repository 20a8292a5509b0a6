"""The web console (/ui) in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Skipped only off CI when Chromium is not installed; under CI (CI=true) a missing browser is a failure, since
.ci/run installs it. Screenshots go to .pytest_cache/console-*.png.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from archon_server.testing.server import serve_process
from tests.conftest import fake_config, require_component

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / ".pytest_cache"
KEY = "console-test-key-6c1f"


def _chromium() -> tuple[str, str] | None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture
def browser() -> Iterator[Any]:
    found = _chromium()
    require_component("Chromium", None if found else "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    assert found is not None
    from selenium import webdriver  # the test extra; a missing one is an install error, not a skip
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800",
              "--disable-extensions", "--no-first-run", "--lang=en-US"):
        opts.add_argument(a)
    # The driver path is given, so Selenium Manager never looks for (or downloads) a browser.
    drv = webdriver.Chrome(service=Service(executable_path=found[1]), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def wait_for(cond, timeout: float = 60, what: str = "condition"):  # type: ignore[no-untyped-def]
    t0 = time.time()
    last: Exception | None = None
    while time.time() - t0 < timeout:
        try:
            v = cond()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - element not there yet
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f" (last error: {last})" if last else ""))


def by(drv, css: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return drv.find_element(By.CSS_SELECTOR, css)


def all_by(drv, css: str) -> list:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return drv.find_elements(By.CSS_SELECTOR, css)


def click_tab(drv, name: str) -> None:  # type: ignore[no-untyped-def]
    by(drv, f'#tabs button[data-tab="{name}"]').click()


def click_when(drv, css: str, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Find and click in one attempt, retried: a list redrawn between the two (the recent list refreshes when a
    request ends and again when its tab opens) leaves a found element stale (a CI failure)."""

    def attempt() -> bool:
        by(drv, css).click()
        return True

    wait_for(attempt, timeout, what)


def enter_key(drv, key: str) -> None:  # type: ignore[no-untyped-def]
    wait_for(lambda: by(drv, "#key-dialog").get_attribute("open") is not None, 30, "the key dialog")
    by(drv, "#key-input").send_keys(key)
    by(drv, "#key-ok").click()


# One read of the trace view, in the page: the view may be redrawn between two WebDriver calls (opening a trace
# from another tab draws it again), and elements found before a redraw are stale afterwards.
_WATERFALL_JS = """
const bars = [...document.querySelectorAll('#tr-waterfall g.wf-bar')];
const sum = document.querySelector('#tr-summary');
return {bars: bars.length, requests: bars.reduce((a, b) => a + Number(b.getAttribute('data-requests')), 0),
        critical: bars.some(b => (b.getAttribute('class') || '').includes('critical')),
        calls: sum ? sum.getAttribute('data-calls') : null,
        layers: document.querySelectorAll('#tr-layers .layer-card').length};
"""


def waterfall_matches(drv, trace: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    """The waterfall draws one bar per call record, their requests add up to the trace's call count, one bar is on
    the critical path, and the summary and layer cards agree."""
    records = [c for layer in trace["layers"] for c in layer["calls"]]
    want = {"bars": len(records), "requests": trace["calls"], "critical": True, "calls": str(trace["calls"]),
            "layers": len(trace["layers"])}
    seen: list[Any] = [None]

    def matches() -> bool:
        seen[0] = drv.execute_script(_WATERFALL_JS)
        return seen[0] == want

    try:
        wait_for(matches, 30, "the trace view")
    except AssertionError:
        raise AssertionError(f"trace view shows {seen[0]}, expected {want}") from None


@pytest.fixture
def embedded_server() -> Iterator[str]:
    """`archon serve` as a user starts it (embedded default model), with an API key configured."""
    log = SHOTS / "console-serve.log" if SHOTS.is_dir() else None
    with serve_process(["serve"], env={"ARCHON_API_KEYS": KEY}, log=log, cwd=str(ROOT)) as (_proc, url):
        yield url


@pytest.mark.e2e
def test_playground_streams_self_moa_on_the_embedded_model_with_a_key(browser, embedded_server):
    drv = browser
    drv.get(embedded_server + "/ui")
    enter_key(drv, KEY)  # keys are on: the page asks once
    wait_for(lambda: "self-moa" in [o.get_attribute("value") for o in all_by(drv, "#pg-model option")], 30, "the architectures")
    assert by(drv, "#pg-model").get_attribute("value") == "self-moa"
    by(drv, "#pg-max_tokens").clear()
    by(drv, "#pg-max_tokens").send_keys("48")
    by(drv, "#pg-send").click()
    # the live graph is drawn from the first trace event, calls appear while the request runs
    wait_for(lambda: len(all_by(drv, "#pg-graph .g-layer")) == 2, 120, "the live graph's two layers")
    wait_for(lambda: all_by(drv, "#pg-graph .g-call"), 120, "a call in the live graph")
    # streamed text appears before the request is over
    wait_for(lambda: by(drv, "#pg-answer").text.strip(), 300, "streamed text")
    assert by(drv, "#pg-status").text in ("running…", "") or by(drv, "#pg-status").text.startswith("done")
    wait_for(lambda: by(drv, "#pg-status").text.startswith(("done", "failed")), 300, "the end of the request")
    assert by(drv, "#pg-status").text.startswith("done"), by(drv, "#banner").text
    assert all("ok" in c.get_attribute("class") for c in all_by(drv, "#pg-graph .g-call"))
    assert [m.text.split(" · ")[0] for m in all_by(drv, "#pg-graph .g-layer .meta")] == ["0 in → 6 out", "6 in → 1 out"]
    answer = by(drv, "#pg-answer").text
    # the server kept the trace; the waterfall shows the calls it reports
    listed = httpx.get(embedded_server + "/v1/traces", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    trace = httpx.get(embedded_server + f"/v1/traces/{listed[0]['id']}", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert trace["answers"][0].strip() == answer.strip() and trace["trace"]["calls"] == 2
    drv.save_screenshot(str(SHOTS / "console-playground.png"))
    by(drv, "#pg-open-trace").click()
    waterfall_matches(drv, trace["trace"])
    drv.save_screenshot(str(SHOTS / "console-trace.png"))
    # the recent list shows it, and opening it from there gives the same view
    click_tab(drv, "recent")
    click_when(drv, f'#rc-table tr[data-id="{trace["id"]}"]', 30, "the request in the recent list")
    wait_for(lambda: "active" in by(drv, '#tabs button[data-tab="trace"]').get_attribute("class"), 30, "the row to open its trace")
    waterfall_matches(drv, trace["trace"])
    # the key lives in the tab's session storage only
    assert drv.execute_script("return sessionStorage.getItem('archon-console-key')") == KEY
    assert drv.execute_script("return localStorage.length") == 0


def test_saved_trace_file_opens_in_the_viewer_without_keys(browser, upstream_factory, server_factory, tmp_path):
    up = upstream_factory()
    srv = server_factory(fake_config(up.url))  # no keys configured: no dialog
    drv = browser
    # a trace as `archon run --trace` prints it (a bare trace), from a rank-critic-fuse run with 2 failed generators
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
        "model": "archon-rank-critic-fuse", "messages": [{"role": "user", "content": "fine"}], "return_trace": True})
    trace = r.json()["trace"]
    trace["layers"][0]["calls"][0].update(ok=False, status="error", error="upstream answered 500: boom")
    trace["layers"][0]["failures"].append("generator0: upstream answered 500: boom")
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    drv.get(srv.url + "/ui/")
    wait_for(lambda: by(drv, "#conn-text").text.endswith("architectures"), 30, "the connection")
    assert by(drv, "#key-dialog").get_attribute("open") is None
    click_tab(drv, "trace")
    by(drv, "#tr-file").send_keys(str(path))
    waterfall_matches(drv, trace)
    bars = all_by(drv, "#tr-waterfall g.wf-bar")
    # the bar of the call marked failed (found by its id: bars are drawn by start time, records kept by end time)
    failed_id = str(trace["layers"][0]["calls"][0]["id"])
    assert [b.get_attribute("data-call") for b in bars if "failed" in b.get_attribute("class")] == [failed_id]
    assert "upstream answered 500" in by(drv, '#tr-layers .layer-card[data-layer="0"]').get_attribute("textContent")
    ranker = by(drv, '#tr-layers .layer-card[data-layer="1"]').get_attribute("textContent")
    assert ranker.count("kept #") == 5 and ranker.count("dropped") == 3
    # expanding a candidate shows its whole text
    cand = all_by(drv, '#tr-layers .layer-card[data-layer="0"] details.cand')[1]
    cand.find_element("css selector", "summary").click()
    wait_for(lambda: trace["layers"][0]["candidates"][1]["text"] in cand.find_element("css selector", "pre").text, 10, "the expanded text")
    drv.save_screenshot(str(SHOTS / "console-loaded-trace.png"))
    # a downloaded trace (a /v1/traces entry) and JSON lines of responses load too
    entry = httpx.get(srv.url + "/v1/traces").json()["data"][0]
    stored = httpx.get(srv.url + f"/v1/traces/{entry['id']}").json()
    lines = tmp_path / "results.jsonl"
    lines.write_text(json.dumps(stored) + "\n" + json.dumps({"id": "x", "trace": trace}) + "\n")
    by(drv, "#tr-file").send_keys(str(lines))
    wait_for(lambda: "2 trace(s)" in by(drv, "#tr-status").text, 20, "two traces from the JSON lines")
    waterfall_matches(drv, stored["trace"])
    # a sweep's results (keep_traces: true): one trace per answer, one per turn for multi-turn questions
    sweep_out = _sweep_with_traces(tmp_path)
    records = [json.loads(x) for x in (sweep_out / "results.jsonl").read_text().splitlines()]
    by(drv, "#tr-file").send_keys(str(sweep_out / "results.jsonl"))
    wait_for(lambda: "3 trace(s)" in by(drv, "#tr-status").text, 20, "the sweep's three traces")
    waterfall_matches(drv, next(r for r in records if "trace" in r)["trace"])
    from selenium.webdriver.support.select import Select

    pick = Select(by(drv, "#tr-pick"))  # results are written as answers finish: find the second turn by its label
    pick.select_by_index(next(i for i, o in enumerate(pick.options) if "turn 2" in o.text))
    waterfall_matches(drv, next(r for r in records if "traces" in r)["traces"][1])
    assert "mt_bench" in by(drv, "#tr-summary").text and "turn 2" in by(drv, "#tr-summary").text


def _sweep_with_traces(tmp_path: Path) -> Path:
    import asyncio

    from archon_server.bench import sweep as sw
    from tests.bench_fakes import ScriptedUpstream, make_registry

    (tmp_path / "tiny-moa.yaml").write_text("name: tiny-moa\nlayers:\n  - - {type: generator, models: [proposer-1, proposer-2]}\n"
                                           "  - - {type: fuser, model: aggregator}\n")
    spec = sw.SweepSpec.model_validate({"name": "t", "judge": "judge", "keep_traces": True, "architectures": [str(tmp_path / "tiny-moa.yaml")],
                                        "benchmarks": [{"name": "math500", "split": "dev", "n": 1}, {"name": "mt_bench", "n": 1}]})
    asyncio.run(sw.run_sweep(spec, tmp_path / "sweep", registry=make_registry(ScriptedUpstream()), progress=False))
    return tmp_path / "sweep"


def test_compare_failures_and_an_unreachable_server(browser, upstream_factory, server_factory):
    up = upstream_factory(lambda b: {"text": "side by side answer", "token_delay": 0.005} if b.get("stream") else None)
    srv = server_factory(fake_config(up.url))
    drv = browser
    drv.get(srv.url + "/ui/")
    wait_for(lambda: by(drv, "#conn-text").text.endswith("architectures"), 30, "the connection")
    click_tab(drv, "compare")
    from selenium.webdriver.support.select import Select

    for sel, model in zip(all_by(drv, ".cmp-model"), ["self-moa", "moa-lite", "best-of-n"]):
        Select(sel).select_by_value(model)
    by(drv, "#cmp-send").click()
    wait_for(lambda: by(drv, "#cmp-status").text == "done", 60, "the comparison")
    cols = all_by(drv, "#cmp-results .cmp-col")
    assert [c.get_attribute("data-model") for c in cols] == ["self-moa", "moa-lite", "best-of-n"]
    assert all(c.get_attribute("data-done") == "1" for c in cols)
    assert "side by side answer" in cols[0].text and "backend calls 2" in cols[0].text
    assert "backend calls 7" in cols[1].text
    drv.save_screenshot(str(SHOTS / "console-compare.png"))
    # a failing request: a clear message, and it shows in red in the recent list
    click_tab(drv, "playground")
    Select(by(drv, "#pg-model")).select_by_value("self-moa")
    up.script = lambda b: {"fault": "500"}
    by(drv, "#pg-send").click()
    wait_for(lambda: by(drv, "#pg-status").text == "failed", 60, "the failure")
    assert "502" in by(drv, "#banner").text or "failed" in by(drv, "#banner").text.lower()
    assert by(drv, "#banner").is_displayed()
    click_tab(drv, "recent")
    wait_for(lambda: "failed (502)" in by(drv, "#rc-table tbody").text, 20, "the failed request listed")
    # YAML editing: live validation names the bad path
    click_tab(drv, "playground")
    by(drv, "#pg-yaml-box summary").click()
    wait_for(lambda: by(drv, "#pg-yaml-status").text.startswith("valid"), 20, "the preset's YAML validated")
    box = by(drv, "#pg-yaml")
    box.clear()
    box.send_keys("name: x\nlayers:\n  - - {type: generator, model: default}\n  - - {type: ranker, model: judge, top_k: 0}\n")
    wait_for(lambda: "layers[1][0].top_k" in by(drv, "#pg-yaml-status").text, 20, "the validation error")
    # the server goes away: the page says so instead of going blank
    srv.stop()
    by(drv, "#pg-send").click()
    wait_for(lambda: "unreachable" in by(drv, "#banner").text, 30, "the unreachable message")
    assert by(drv, "#conn-text").text == "unreachable"
    assert drv.execute_script("const r = document.querySelector('#banner').getBoundingClientRect(); return r.top >= 0 && r.bottom <= innerHeight")
    drv.save_screenshot(str(SHOTS / "console-unreachable.png"))
