"""Server overhead: ensemble latency vs the critical path, throughput, CPU per backend call, peak RSS.

Fake upstream (separate process, fixed latency) <- our server (separate process, real uvicorn)
<- N concurrent clients (this process, aiohttp).  Prints, per architecture and client count:
latency / critical path (p50), requests/s, p50/p99 added latency (ms), server CPU ms per backend
call, server peak RSS.  Goals (issue 2): ratio <= 1.05 with 1 client, <= 1.3 with 32; <= 1 ms CPU/call.

``--stream``: every request streams (the final stage's answer is ``--tokens`` words, one SSE chunk each). Per
architecture and client count it prints the server's CPU per forwarded token beside the fake upstream's own CPU per
token sent when the same stream is fetched from it directly, in the same run (issue 20: <= 0.05 ms per token).
``stream-probe`` is one streamed generator call (nothing but forwarding); self-moa adds its non-streamed sample call.

    python benchmarks/overhead.py [--latency 0.05] [--clients 1,8,32,200] [--seconds 5]
    python benchmarks/overhead.py --stream [--tokens 256] [--clients 1,8,32] [--archs stream-probe,self-moa]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from archon_server.config import PRESET_ALIASES  # noqa: E402
from archon_server.spec import load_architecture  # noqa: E402
from archon_server.testing.procs import descendants  # noqa: E402
from archon_server.testing.upstream import free_port  # noqa: E402

UPSTREAM = """
import sys, time
from archon_server.testing.upstream import FakeUpstream
words = int(sys.argv[3])
text = " ".join(f"w{i}" for i in range(words))
# --stream: every streamed answer is `words` tokens; non-streamed calls (the samples) keep the default answers
up = FakeUpstream((lambda body: {"text": text} if body.get("stream") else None) if words else None, latency=float(sys.argv[1]))
up.port = int(sys.argv[2])
up.start()
print("ready", flush=True)
sys.stdin.read()
"""


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``--workers``: uvicorn's supervisor and its worker processes)."""
    return [pid, *descendants(pid)]


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the server: the process and its workers. The system part is mostly the
    kernel's loopback TCP (a send on 127.0.0.1 delivers into the receiver's socket inside the sender's syscall)."""
    user = system = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / os.sysconf("SC_CLK_TCK")
        system += int(fields[12]) / os.sysconf("SC_CLK_TCK")
    return user, system


def proc_cpu_s(pid: int) -> float:
    """CPU seconds of the server: the process and its workers."""
    return sum(proc_cpu_split(pid))


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of the server, summed over its processes."""
    total = 0.0
    for p in _tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(ln.split()[1]) / 1024 for ln in status.splitlines() if ln.startswith("VmHWM:")), 0.0)
    return total


def depth(arch: str) -> int:
    return len(load_architecture(ROOT / "architectures" / f"{arch}.yaml").layers)


def calls(arch: str) -> int:
    return load_architecture(ROOT / "architectures" / f"{arch}.yaml").backend_calls_estimate()


def vs_direct(rps: float, direct: float, arch: str) -> str:
    """req/s ÷ (direct upstream req/s ÷ layers), for an architecture of one call per layer (self-moa: issue 20's
    measure). With more calls than layers the upstream's capacity, not its latency, caps the ideal: not comparable."""
    if calls(arch) != depth(arch):
        return f"{'-':>9}"
    return f"{rps / (direct / depth(arch)):9.2f}"


async def wait_http(url: str, timeout: float = 60) -> None:
    t0 = time.time()
    async with aiohttp.ClientSession() as s:
        while time.time() - t0 < timeout:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def drive(url: str, clients: int, seconds: float, body: Callable[[int, int], dict[str, Any]],
                on_response: Callable[[aiohttp.ClientResponse, float], Awaitable[None]]) -> None:
    """The closed loop every table uses: ``clients`` workers, each POSTing ``body(worker, k)`` to ``url``'s chat
    completions until ``seconds`` have passed; ``on_response(response, start)`` reads each answer (not 200: an error)."""
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=clients + 8)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:

        async def worker(i: int) -> None:
            k = 0
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with s.post(url + "/v1/chat/completions", json=body(i, k)) as r:
                    if r.status != 200:
                        raise RuntimeError(f"status {r.status}: {await r.text()}")
                    await on_response(r, t0)
                k += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))


def ask(model: str, **extra: Any) -> Callable[[int, int], dict[str, Any]]:
    """Request k of worker i: a user message unique to it (no cache anywhere answers it)."""
    return lambda i, k: {"model": model, "messages": [{"role": "user", "content": f"client {i} request {k}"}], **extra}


async def load(url: str, arch: str, clients: int, seconds: float) -> tuple[list[float], list[float]]:
    """Latencies and, per request, its critical path from the trace (sum over layers of the slowest call)."""
    lat: list[float] = []
    crit: list[float] = []

    async def got(r: aiohttp.ClientResponse, t0: float) -> None:
        data = await r.json()
        lat.append(time.perf_counter() - t0)
        crit.append(sum(max(c["latency_s"] for c in layer["calls"]) for layer in data["trace"]["layers"] if layer["calls"]))

    await drive(url, clients, seconds, ask(arch, return_trace=True), got)
    return lat, crit


async def load_direct(up_url: str, clients: int, seconds: float) -> int:
    """Requests answered when ``clients`` workers call the fake upstream directly (one plain chat call each): the
    upstream's own throughput at this client count, the ceiling the server's calls share."""
    done = 0

    async def got(r: aiohttp.ClientResponse, t0: float) -> None:
        nonlocal done
        await r.read()
        done += 1

    await drive(up_url, clients, seconds, ask("fake"), got)
    return done


PROBE = "name: stream-probe\ndescription: one streamed generator call (benchmarks/overhead.py --stream)\nlayers:\n  - - {type: generator, model: default}\n"


async def read_stream(r: aiohttp.ClientResponse) -> int:
    """Tokens (content deltas) in an SSE chat stream. A cheap byte count, not a JSON parse: the load generator shares
    the cores with the server."""
    tokens = 0
    async for line in r.content:
        if line.startswith(b"data: ") and (b'"content":"' in line or b'"content": "' in line) and b'"content":""' not in line and b'"content": ""' not in line:
            tokens += 1
    return tokens


async def load_stream(url: str, model: str, clients: int, seconds: float) -> tuple[list[float], int]:
    """Streamed requests from ``clients`` workers for ``seconds``: latencies and the tokens received."""
    lat: list[float] = []
    tokens = 0

    async def got(r: aiohttp.ClientResponse, t0: float) -> None:
        nonlocal tokens
        n = await read_stream(r)  # not `tokens += await ...`: that reads `tokens` before the await
        tokens += n
        lat.append(time.perf_counter() - t0)

    await drive(url, clients, seconds, ask(model, stream=True), got)
    return lat, tokens


def _run(coro):  # type: ignore[no-untyped-def]
    try:  # the load generator shares the cores with the server: keep its own cost low
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def stream_table(a: argparse.Namespace, url: str, up_url: str, server_pid: int, upstream_pid: int) -> None:
    """Per architecture and client count: the server's CPU per forwarded token, and the upstream's CPU per token when
    the same stream is fetched from it directly (same clients, same seconds, same run)."""
    print(f"fake upstream latency {a.latency * 1000:.0f} ms; {a.tokens} tokens per streamed answer; {a.seconds:.0f} s per cell")
    print("server ms/tok = server CPU / tokens forwarded (all of the request's CPU, non-streamed layers included);")
    print("upstream ms/tok = the fake upstream's CPU / tokens sent when the client streams from it directly")
    print(f"{'architecture':14} {'clients':>7} {'req/s':>7} {'tok/s':>8} {'server ms/tok':>13} {'upstream ms/tok':>15} {'ratio':>6} {'direct tok/s':>12}")
    for arch in a.archs.split(","):
        for c in [int(x) for x in a.clients.split(",")]:
            _run(load_stream(url, arch, min(c, 4), 0.5))  # warm-up
            cpu0 = proc_cpu_s(server_pid)
            t0 = time.perf_counter()
            lat, toks = _run(load_stream(url, arch, c, a.seconds))
            wall = time.perf_counter() - t0
            cpu = proc_cpu_s(server_pid) - cpu0
            _run(load_stream(up_url, "fake", min(c, 4), 0.5))
            ucpu0 = proc_cpu_s(upstream_pid)
            t1 = time.perf_counter()
            _, dtoks = _run(load_stream(up_url, "fake", c, a.seconds))
            dwall = time.perf_counter() - t1
            ucpu = proc_cpu_s(upstream_pid) - ucpu0
            per_tok = cpu / max(toks, 1) * 1000
            up_tok = ucpu / max(dtoks, 1) * 1000
            print(f"{arch:14} {c:7d} {len(lat) / wall:7.1f} {toks / wall:8.0f} {per_tok:13.4f} {up_tok:15.4f} {per_tok / max(up_tok, 1e-9):6.2f} {dtoks / dwall:12.0f}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--clients", default="1,8,32,200")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--archs", default=None, help="default moa-lite,moa,archon-rank-critic-fuse,self-moa; with --stream stream-probe,self-moa")
    ap.add_argument("--stream", action="store_true", help="streamed requests: server CPU per forwarded token vs the upstream's")
    ap.add_argument("--tokens", type=int, default=256, help="--stream: tokens in each streamed answer")
    ap.add_argument("--profile", default=None, help="run the server under cProfile, stats to this file (pstats)")
    ap.add_argument("--workers", type=int, default=1, help="`archon serve --workers N` (CPU and RSS: all its processes)")
    a = ap.parse_args()
    a.archs = a.archs or ("stream-probe,self-moa" if a.stream else "moa-lite,moa,archon-rank-critic-fuse,self-moa")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Both children run in this checkout: `python -m`/`-c` put the working directory first on sys.path, so run from
    # another checkout they measured that one's package (an A/B of two trees from one directory compared nothing).
    run_here = {"env": env, "cwd": str(ROOT)}
    up_port, srv_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(a.latency), str(up_port), str(a.tokens if a.stream else 0)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, **run_here)
    assert upstream.stdout is not None
    upstream.stdout.readline()
    probe_dir = tempfile.mkdtemp(prefix="archon-probe-")
    Path(probe_dir, "stream-probe.yaml").write_text(PROBE)
    cfg = {
        "backends": [{"alias": "fake", "kind": "openai", "model": "fake", "urls": [f"http://127.0.0.1:{up_port}/v1"], "aliases": PRESET_ALIASES, "max_connections": 4096}],
        "architectures_dirs": [str(ROOT / "architectures"), probe_dir],
        "server": {"max_concurrent_requests": 10_000},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(cfg, f)
    prof = ["-m", "cProfile", "-o", str(Path(a.profile).resolve())] if a.profile else []  # written when the server exits (SIGTERM)
    server = subprocess.Popen([sys.executable, *prof, "-m", "archon_server", "serve", "-c", f.name, "--port", str(srv_port), "--log-level", "warning",
                               "--workers", str(a.workers)], stdout=subprocess.DEVNULL, **run_here)
    url = f"http://127.0.0.1:{srv_port}"
    try:
        asyncio.run(wait_http(url + "/health"))
        up = f"http://127.0.0.1:{up_port}"
        if a.stream:
            stream_table(a, url, up, server.pid, upstream.pid)
            return
        print(f"fake upstream latency {a.latency * 1000:.0f} ms; {a.seconds:.0f} s per cell; server workers {a.workers}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print("ratio = end-to-end latency / critical path measured in the trace (sum of each layer's slowest call);")
        print("nominal = end-to-end latency / (layers x upstream latency); +ms = added over the traced critical path")
        print("vs direct = req/s / (direct upstream req/s at the same client count / layers), for one call per layer: 1.0")
        print("when the server costs nothing (issue 20: self-moa >= 0.8); direct = the same clients calling the fake upstream")
        print(f"{'architecture':26} {'clients':>7} {'ratio p50':>9} {'nominal':>8} {'req/s':>8} {'+p50 ms':>8} {'+p99 ms':>8} {'CPU ms/call':>11} {'sys share':>9} {'peak RSS MB':>11} {'direct req/s':>12} {'vs direct':>9}")
        for arch in a.archs.split(","):
            nominal = depth(arch) * a.latency
            for c in [int(x) for x in a.clients.split(",")]:
                _run(load(url, arch, min(c, 4), 0.5))  # warm-up
                user0, sys0 = proc_cpu_split(server.pid)
                t0 = time.perf_counter()
                lat, crit = _run(load(url, arch, c, a.seconds))
                wall = time.perf_counter() - t0
                user1, sys1 = proc_cpu_split(server.pid)
                cpu = user1 - user0 + sys1 - sys0
                added = sorted(x - y for x, y in zip(lat, crit))
                ratio = statistics.median(x / y for x, y in zip(lat, crit))
                p50 = statistics.median(lat)
                per_call = cpu / (len(lat) * calls(arch)) * 1000
                _run(load_direct(up, min(c, 4), 0.5))
                t1 = time.perf_counter()
                direct = _run(load_direct(up, c, a.seconds)) / (time.perf_counter() - t1)
                print(
                    f"{arch:26} {c:7d} {ratio:9.3f} {p50 / nominal:8.3f} {len(lat) / wall:8.1f} {statistics.median(added) * 1000:8.1f} "
                    f"{added[min(len(added) - 1, int(0.99 * len(added)))] * 1000:8.1f} {per_call:11.3f} {(sys1 - sys0) / max(cpu, 1e-9):9.2f} {peak_rss_mb(server.pid):11.1f} "
                    f"{direct:12.1f} {vs_direct(len(lat) / wall, direct, arch)}",
                    flush=True,
                )
    finally:
        # uvicorn re-raises the signal it stopped on: SIGTERM kills the process before cProfile writes; SIGINT
        # comes back as KeyboardInterrupt, which cProfile survives
        server.send_signal(signal.SIGINT if a.profile else signal.SIGTERM)
        server.wait(30)
        upstream.kill()
        os.unlink(f.name)
        shutil.rmtree(probe_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
