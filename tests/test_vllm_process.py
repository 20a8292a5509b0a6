"""Managed-vLLM supervision tested against a fake `vllm serve` (tests/_vllm_fake_server.py): fast, no vLLM needed.

The real-vLLM counterpart is tests/test_vllm.py (marker `vllm`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from archon_server.backends.base import BackendError, ChatRequest, SamplingParams
from archon_server.backends.vllm_managed import VLLMManagedBackend, VLLMOptions, build_command
from archon_server.testing.procs import alive

FAKE = str(Path(__file__).with_name("_vllm_fake_server.py"))
FAKE_CMD = [sys.executable, FAKE, "{args}"]


async def wait_until(cond, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def fake_backend(**kw) -> VLLMManagedBackend:  # type: ignore[no-untyped-def]
    opts = {"command": FAKE_CMD, "startup_timeout_s": 60, "restart_backoff_s": 0.05, "stop_grace_s": 5}
    opts.update(kw)
    return VLLMManagedBackend(name="fake", model=os.devnull, **opts)


def req(text: str = "hi", **params) -> ChatRequest:  # type: ignore[no-untyped-def]
    return ChatRequest(model="whatever-alias", messages=[{"role": "user", "content": text}], params=SamplingParams(**params))


def test_build_command_default_and_template() -> None:
    opts = VLLMOptions(
        model="m",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.8,
        max_model_len=2048,
        speculative_config={"model": "/draft", "num_speculative_tokens": 4},
        enforce_eager=True,
        extra_args=["--seed", "1"],
    )
    argv = build_command(opts, "/venv/bin/python", "/models/m", "served", 9000, 0)
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--port") + 1] == "9000"
    assert argv[argv.index("--served-model-name") + 1] == "served"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.8"
    assert argv[argv.index("--max-model-len") + 1] == "2048"
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == {"model": "/draft", "num_speculative_tokens": 4}
    assert "--enforce-eager" in argv and argv[-2:] == ["--seed", "1"]

    tmpl = VLLMOptions(model="m", command=["vllm", "serve", "{model}", "--tag", "r{replica}", "{args}"])
    argv = build_command(tmpl, "py", "/models/m", "s", 9001, 3)
    assert argv[:5] == ["vllm", "serve", "/models/m", "--tag", "r3"] and "--port" in argv


def test_parse_prometheus() -> None:
    from archon_server.backends.vllm_managed import parse_prometheus

    text = '# HELP x\nvllm:a_total{engine="0"} 3.0\nvllm:a_created{engine="0"} 1.7e9\nvllm:g 2\nbad line\n'
    assert parse_prometheus(text) == [("vllm:a_total", 3.0), ("vllm:g", 2.0)]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        VLLMOptions(model="m", replicas=2, replica_devices=["0"])
    with pytest.raises(ValueError):
        VLLMOptions(model="m", no_such_option=1)  # type: ignore[call-arg]


async def test_replicas_serve_chat_n_stream_models(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="archon.backends.vllm")
    b = fake_backend(replicas=2)
    try:
        await b.start()
        assert [r.state for r in b.replicas] == ["ready", "ready"]
        pids = b.pids
        assert all(pids) and len(set(pids)) == 2
        res = await b.chat(req("q", n=3))
        # one upstream request carried all three samples, under the served name (not the caller's alias)
        assert len(res.choices) == 3 and res.requests == 1
        assert res.choices[0].text.startswith("echo:q:")
        chunks = [c async for c in b.stream(req("s", n=2))]
        texts = {i: "".join(c.text for c in chunks if c.index == i and c.text) for i in (0, 1)}
        assert all(t.startswith("echo:s:") for t in texts.values())
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        assert await b.models() == ["fake"]
        assert await b.health()
        # both replicas' logs reach our logger under their own prefix
        logged = caplog.text
        assert "[vllm:fake:0] fake vllm pid=" in logged and "[vllm:fake:1] fake vllm pid=" in logged
    finally:
        await b.close()
    assert not any(alive(p) for p in pids)
    assert not await b.health()


async def test_greedy_n_asks_once_and_copies() -> None:
    b = fake_backend()
    try:
        await b.start()
        res = await b.chat(req("g", n=3, temperature=0.0))
        assert [c.index for c in res.choices] == [0, 1, 2] and len({c.text for c in res.choices}) == 1
        assert res.requests == 1 and res.usage.completion_tokens == 2  # usage of the one real sample
        chunks = [c async for c in b.stream(req("g", n=2, temperature=0.0))]
        assert "".join(c.text for c in chunks if c.index == 0) == "".join(c.text for c in chunks if c.index == 1) != ""
        assert {c.index for c in chunks if c.finish_reason} == {0, 1}
    finally:
        await b.close()


async def test_killed_replica_is_restarted_and_its_children_reaped() -> None:
    b = fake_backend(extra_args=["--fork-child"])
    try:
        await b.start()
        old = b.pids[0]
        assert old is not None
        await wait_until(lambda: any("child pid=" in line for line in b.replicas[0].proc.tail), 10, "child log line")
        child = int(next(line for line in b.replicas[0].proc.tail if "child pid=" in line).split("=")[1])
        assert alive(child)
        os.kill(old, signal.SIGKILL)
        await wait_until(lambda: b.restarts == 1 and b.replicas[0].state == "ready", 60, "restart")
        assert b.pids[0] not in (None, old)
        assert b.replicas[0].pids == [old, b.pids[0]]
        # the dead leader's forked child must not outlive it
        await wait_until(lambda: not alive(child), 10, "orphan child to die")
        res = await b.chat(req("again"))
        assert res.choices[0].text.endswith(f"pid={b.pids[0]}")
    finally:
        await b.close()


async def test_startup_failure_names_command_and_log() -> None:
    b = fake_backend(command=[sys.executable, "-c", "print('boom-xyz', flush=True); raise SystemExit(3)", "{args}"])
    with pytest.raises(BackendError) as ei:
        await b.start()
    msg = str(ei.value)
    assert "boom-xyz" in msg and "status 3" in msg and "-c" in msg
    assert b.replicas == []  # start() cleaned up


async def test_startup_timeout_stops_the_process() -> None:
    b = fake_backend(command=[sys.executable, "-c", "import time; print('slow', flush=True); time.sleep(600)", "{args}"], startup_timeout_s=1.5)
    seen: list[int] = []
    orig = b._launch

    async def spy(r):  # type: ignore[no-untyped-def]
        try:
            await orig(r)
        finally:
            seen.extend(r.pids)

    b._launch = spy  # type: ignore[method-assign]
    with pytest.raises(BackendError, match="not healthy within 2s"):
        await b.start()
    assert seen and not alive(seen[0])


async def test_requests_before_start_fail_clearly() -> None:
    b = fake_backend()
    with pytest.raises(BackendError, match="not started"):
        await b.chat(req())


_DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    sys.path.insert(0, {root!r})
    from archon_server.backends.vllm_managed import VLLMManagedBackend

    async def main():
        b = VLLMManagedBackend(name="d", model="/dev/null", command={cmd!r}, extra_args=["--fork-child"])
        await b.start()
        while not any("child pid=" in l for l in b.replicas[0].proc.tail):
            await asyncio.sleep(0.05)
        child = int(next(l for l in b.replicas[0].proc.tail if "child pid=" in l).split("=")[1])
        print(json.dumps({{"leader": b.pids[0], "child": child}}), flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_no_orphans_when_our_process_dies(sig: int) -> None:
    root = str(Path(__file__).resolve().parents[1])
    code = _DRIVER.format(root=root, cmd=FAKE_CMD)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(driver.stdout.readline), 60)  # type: ignore[union-attr]
        pids = json.loads(line)
        assert alive(pids["leader"]) and alive(pids["child"])
        driver.send_signal(sig)
        await asyncio.to_thread(driver.wait, 30)
        # SIGTERM: our handler kills the whole group; SIGKILL runs no code of ours, PDEATHSIG stops the leader.
        await wait_until(lambda: not alive(pids["leader"]), 30, "leader to die")
        if sig == signal.SIGTERM:
            await wait_until(lambda: not alive(pids["child"]), 30, "child to die")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for p in (locals().get("pids") or {}).values():
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_stopped_process_leaves_no_open_pipe_behind_its_event_loop():
    """stop() reads the output pipe to its end: a pipe still open when the loop ended made asyncio's subprocess
    transport close itself from ``__del__`` and print "Exception ignored ... RuntimeError: Event loop is closed"
    (the end of ``benchmarks/backends.py``: vLLM's engine core, a grandchild, holds the pipe)."""
    import gc

    from archon_server.backends.process import SupervisedProcess

    # The grandchild ignores SIGTERM, as a busy engine core may: it holds the pipe until the group's SIGKILL.
    grandchild = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('gc', flush=True); time.sleep(60)"
    child = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             "time.sleep(1); print('up', flush=True); time.sleep(60)")

    async def run() -> SupervisedProcess:
        p = SupervisedProcess([sys.executable, "-c", child], prefix="t")
        await p.start()
        await wait_until(lambda: "up" in p.tail, 30, "the child's first line")
        await p.stop(grace_s=5)
        return p

    seen: list = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        p = asyncio.run(run())
        del p
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert not seen, [repr(u.exc_value) for u in seen]
