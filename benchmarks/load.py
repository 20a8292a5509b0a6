"""Load: the real server under 10 -> 1000 concurrent clients, streaming and not, with nothing lost.

Fake upstream (separate process: latency + jitter, streams token by token) <- our server (separate process,
`python -m archon_server serve -c CONFIG`) <- N concurrent clients (this process, aiohttp), each sending
requests back to back for a fixed time.  Per step: requests/s, p50/p99 latency, errors (non-200, error events,
exceptions, answers without [DONE]), server peak RSS.  Then:

- memory and descriptors: server RSS and open fds (/proc/PID/fd) after warm-up vs after the run + an idle longer
  than the pool's keep-alive;
  goals: RSS back within 10% of its start, no fd growth;
- back-pressure: a burst beyond `server.max_concurrent_requests` must get 429s, fast (p99 of the 429s), while the
  admitted requests all succeed;
- big bodies: 40 clients at once, each sending a 3.9 MB body (under the 4 MB limit), against a 10 s deadline, on a
  fresh server, once with the request-body byte budget out of the way and once with the default budget: the
  server's peak RSS (goal < 400 MB; it was 1.46 GB before the budget), statuses, and the slowest answer (goal:
  by the deadline + 0.5 s). `--only big` runs just this.

Goals: 0 errors at 1000 concurrent streams.  Traffic goes to 127.0.0.1 only; every loop is bounded in time.

    python benchmarks/load.py [--clients 10,100,500,1000] [--seconds 10] [--latency 0.2 --jitter 0.2]
                              [--model fake] [--rounds 1] [--json out.json] [--only sweep|big]
                              [--big-clients 40 --big-mb 3.9 --big-rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from archon_server.config import PRESET_ALIASES
from archon_server.testing.upstream import free_port

# The upstream process: a realistic model server stand-in (latency with jitter; streams 24 words 5 ms apart).
UPSTREAM = """
import sys
from archon_server.testing.upstream import FakeUpstream
lat, jit, port = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
TEXT = " ".join(f"word{i}" for i in range(24))
def script(body):
    return {"text": TEXT, "token_delay": 0.005} if body.get("stream") else {"text": TEXT}
up = FakeUpstream(script, latency=lat, jitter=jit, seed=1)
up.port = port
up.requests = type("NoRecord", (list,), {"append": lambda self, x: None})()  # a benchmark keeps no history
up.start()
print("ready", flush=True)
sys.stdin.read()
"""


def raise_fd_limit(want: int = 65536) -> tuple[int, int]:
    """1000 clients need ~3 fds each across the three processes here: raise the soft limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_mb(pid: int, key: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


@dataclass
class Step:
    clients: int
    stream: bool
    seconds: float
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lat: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)  # latencies of 429s
    peak_rss_mb: float = 0.0
    wall_s: float = 0.0

    def err(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def row(self) -> dict[str, Any]:
        return {
            "clients": self.clients, "stream": self.stream, "requests": self.ok, "req_per_s": round(self.ok / self.wall_s, 1),
            "p50_ms": round(pct(self.lat, 50) * 1000, 1), "p99_ms": round(pct(self.lat, 99) * 1000, 1),
            "errors": sum(self.errors.values()), "error_kinds": self.errors, "rejected_429": len(self.rejected),
            "p99_429_ms": round(pct(self.rejected, 99) * 1000, 1) if self.rejected else None,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }


async def one(session: aiohttp.ClientSession, url: str, model: str, stream: bool, step: Step) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 64, "stream": stream}
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as r:
            if r.status == 429:
                await r.read()
                step.rejected.append(time.perf_counter() - t0)
                await asyncio.sleep(0.25)  # a polite client backs off before retrying (SDKs wait 0.5 s and more)
                return
            if r.status != 200:
                step.err(f"http {r.status}")
                await r.read()
                return
            if not stream:
                data = await r.json()
                if not data.get("choices") or not data["choices"][0]["message"]["content"]:
                    step.err("empty answer")
                    return
            else:
                done, text = False, 0
                async for line in r.content:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: "):
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            step.err("error event")
                            return
                        text += sum(len(c.get("delta", {}).get("content") or "") for c in ev.get("choices", []))
                if not done or not text:
                    step.err("stream cut" if not done else "empty stream")
                    return
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        step.err(type(e).__name__)
        return
    step.ok += 1
    step.lat.append(time.perf_counter() - t0)


async def run_step(url: str, model: str, clients: int, stream: bool, seconds: float, server_pid: int) -> Step:
    step = Step(clients, stream, seconds)
    end = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)

    async def client(i: int) -> None:
        await asyncio.sleep(i * 0.5 / clients)  # ramp up over half a second, not one SYN flood
        while time.perf_counter() < end:
            await one(session, url, model, stream, step)

    async def sample() -> None:
        while time.perf_counter() < end + 5:
            step.peak_rss_mb = max(step.peak_rss_mb, rss_mb(server_pid))
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        sampler = asyncio.ensure_future(sample())
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        step.wall_s = time.perf_counter() - t0
        sampler.cancel()
    return step


def write_config(path: Path, upstream_url: str, port: int, max_concurrent: int, **server: Any) -> None:
    cfg = {
        "backends": [{"alias": "fake", "kind": "openai", "model": "fake-model", "urls": [upstream_url], "aliases": PRESET_ALIASES,
                      "max_connections": 256, "max_concurrency": 4096, "max_retries": 1, "read_timeout_s": 60}],
        "architectures_dirs": [str(ROOT / "architectures")],
        "server": {"port": port, "max_concurrent_requests": max_concurrent, "request_timeout_s": 120, "api_keys_env": None, **server},
    }
    path.write_text(json.dumps(cfg))


class Server:
    def __init__(self, cfg: Path, port: int, env: dict[str, str] | None = None):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "archon_server", "serve", "-c", str(cfg), "--log-level", "warning"],
                                     cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})

    async def wait(self) -> None:
        deadline = time.time() + 90
        async with aiohttp.ClientSession() as s:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:] if self.proc.stderr else ''}")
                try:
                    async with s.get(self.url + "/health") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def fmt_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'clients':>7} {'stream':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'429s':>6} {'peak RSS MB':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['clients']:>7} {r['stream']!s:>6} {r['req_per_s']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} "
                     f"{r['errors']:>6} {r['rejected_429']:>6} {r['peak_rss_mb']:>11}")
    return "\n".join(lines)


BIG_DEADLINE_S = 10.0


def big_body(mb: float, model: str) -> bytes:
    """One chat request of ``mb`` MB: a long user message of plain words (what a pasted document looks like)."""
    words = " ".join(f"word{i % 997}" for i in range(200_000))
    head = json.dumps({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": ""}]}).encode()
    want = int(mb * 1_000_000) - len(head)
    text = (words * (want // len(words) + 1))[:want]
    return json.dumps({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}).encode()


async def big_bodies(url: str, body: bytes, clients: int, rounds: int, server_pid: int) -> dict[str, Any]:
    """``rounds`` times: ``clients`` requests at once, each with ``body``; statuses, slowest answer, peak RSS."""
    statuses: dict[str, int] = {}
    lat: list[float] = []
    peak = rss_mb(server_pid)
    stop = False

    async def sample() -> None:
        nonlocal peak
        while not stop:
            peak = max(peak, rss_mb(server_pid))
            await asyncio.sleep(0.05)

    async def one(session: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                key = str(r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            key = type(e).__name__
        statuses[key] = statuses.get(key, 0) + 1
        lat.append(time.perf_counter() - t0)

    sampler = asyncio.ensure_future(sample())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)) as session:
        for _ in range(rounds):
            await asyncio.gather(*(one(session) for _ in range(clients)))
    stop = True
    await sampler
    return {"statuses": dict(sorted(statuses.items())), "max_s": round(max(lat), 2), "p50_s": round(pct(lat, 50), 2),
            "rss_peak_mb": round(max(peak, rss_mb(server_pid, "VmHWM:")), 1)}


async def big_step(args: argparse.Namespace, tmp: Path, up_port: int, server_env: dict[str, str], budget: int | None) -> dict[str, Any]:
    """One fresh server (so its VmHWM is this step's alone): boot RSS, then the big-body rounds."""
    port = free_port()
    extra: dict[str, Any] = {"request_timeout_s": BIG_DEADLINE_S}
    if budget is not None:
        extra["max_inflight_body_bytes"] = budget
    write_config(tmp / "big.json", f"http://127.0.0.1:{up_port}/v1", port, max_concurrent=256, **extra)
    srv = Server(tmp / "big.json", port, server_env)
    try:
        await srv.wait()
        boot = rss_mb(srv.proc.pid)
        body = big_body(args.big_mb, "fake")
        res = await big_bodies(srv.url + "/v1/chat/completions", body, args.big_clients, args.big_rounds, srv.proc.pid)
        return {"budget_bytes": budget, "body_bytes": len(body), "clients": args.big_clients, "rounds": args.big_rounds,
                "rss_boot_mb": round(boot, 1), **res}
    finally:
        srv.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    clients = [int(x) for x in args.clients.split(",")]
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(args.latency), str(args.jitter), str(up_port)],
                                cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert upstream.stdout is not None and upstream.stdout.readline().strip() == b"ready"
    tmp = Path(tempfile.mkdtemp(prefix="archon-load-"))
    out: dict[str, Any] = {"latency_s": args.latency, "jitter_s": args.jitter, "seconds": args.seconds, "model": args.model,
                           "fd_limit": list(raise_fd_limit())}
    server_env = {"PYTHONMALLOC": args.pythonmalloc} if args.pythonmalloc else {}
    out["server_env"] = server_env
    try:
        if args.only in (None, "big"):
            # Side by side in one run: the byte budget out of the way (1 TB), then the default budget.
            out["big"] = [await big_step(args, tmp, up_port, server_env, 10**12), await big_step(args, tmp, up_port, server_env, None)]
            for row in out["big"]:
                print(json.dumps(row), flush=True)
        if args.only == "big":
            return out
        # -- main sweep: admission limit above the largest step, so every request must succeed -------------------
        port = free_port()
        write_config(tmp / "load.json", f"http://127.0.0.1:{up_port}/v1", port, max_concurrent=max(clients) + 64)
        srv = Server(tmp / "load.json", port, server_env)
        try:
            await srv.wait()
            pid = srv.proc.pid
            out["rss_boot_mb"] = round(rss_mb(pid), 1)
            warm = await run_step(srv.url + "/v1/chat/completions", args.model, 10, True, 2, pid)
            warm2 = await run_step(srv.url + "/v1/chat/completions", args.model, 10, False, 2, pid)
            if warm.errors or warm2.errors:
                raise RuntimeError(f"warm-up failed: {warm.errors} {warm2.errors}")
            await asyncio.sleep(1)
            out["rss_start_mb"], out["fds_start"] = round(rss_mb(pid), 1), open_fds(pid)
            rows = []
            out["rss_after_round_mb"] = []
            for rnd in range(args.rounds):  # more than one round tells a leak (grows each round) from a high-water mark
                for n in clients:
                    for stream in (False, True):
                        st = await run_step(srv.url + "/v1/chat/completions", args.model, n, stream, args.seconds, pid)
                        rows.append({"round": rnd + 1, **st.row()})
                        print(json.dumps(rows[-1]), flush=True)
                await asyncio.sleep(2)
                out["rss_after_round_mb"].append(round(rss_mb(pid), 1))
            out["steps"] = rows
            out["fds_after_run"] = open_fds(pid)  # includes idle pooled upstream connections (<= max_connections)
            # The pool closes idle upstream connections after aiohttp's keep-alive timeout (15 s): idle past it.
            await asyncio.sleep(args.idle)
            out["rss_end_mb"], out["fds_end"] = round(rss_mb(pid), 1), open_fds(pid)
            out["rss_peak_mb"] = round(rss_mb(pid, "VmHWM:"), 1)
            out["rss_growth_pct"] = round(100 * (out["rss_end_mb"] - out["rss_start_mb"]) / out["rss_start_mb"], 1)
        finally:
            srv.stop()

        # -- back-pressure: a burst of 4x the admission limit ----------------------------------------------------
        port = free_port()
        write_config(tmp / "bp.json", f"http://127.0.0.1:{up_port}/v1", port, max_concurrent=args.bp_limit)
        srv = Server(tmp / "bp.json", port, server_env)
        try:
            await srv.wait()
            st = await run_step(srv.url + "/v1/chat/completions", args.model, 4 * args.bp_limit, False, args.seconds, srv.proc.pid)
            out["backpressure"] = {"limit": args.bp_limit, **st.row()}
            print(json.dumps(out["backpressure"]), flush=True)
        finally:
            srv.stop()
    finally:
        if upstream.stdin:
            upstream.stdin.close()
        upstream.terminate()
        upstream.wait(10)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,100,500,1000")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--latency", type=float, default=0.2, help="upstream base latency (s)")
    ap.add_argument("--jitter", type=float, default=0.2, help="upstream extra latency, uniform in [0, jitter] (s)")
    ap.add_argument("--model", default="fake", help="what clients ask for: a backend alias (one call) or an architecture")
    ap.add_argument("--idle", type=float, default=40.0,
                    help="idle seconds after the run before RSS/fds are read again: idle pooled connections close "
                         "after aiohttp's 15 s keep-alive, checked every 15 s, so up to ~30 s")
    ap.add_argument("--bp-limit", type=int, default=100, help="max_concurrent_requests of the back-pressure server")
    ap.add_argument("--pythonmalloc", help="PYTHONMALLOC for the server, e.g. `malloc`: then the idle heap trim gives "
                    "back nearly all of a burst's memory (pymalloc keeps partly used 1 MiB arenas)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep (RSS is read after each round)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", choices=["sweep", "big"], help="run only the client sweep (+ back-pressure) or only the big bodies")
    ap.add_argument("--big-clients", type=int, default=40, help="big bodies: clients at once")
    ap.add_argument("--big-mb", type=float, default=3.9, help="big bodies: MB per request body")
    ap.add_argument("--big-rounds", type=int, default=3, help="big bodies: how many times all clients send at once")
    args = ap.parse_args()
    out = asyncio.run(main_async(args))
    print()
    failures = []
    for row in out.get("big", []):
        over = row["max_s"] > BIG_DEADLINE_S + 0.5
        print(f"big bodies: {row['clients']} x {row['body_bytes'] / 1e6:.1f} MB at once x {row['rounds']} rounds, budget "
              f"{'off' if row['budget_bytes'] else 'default'}: server RSS boot {row['rss_boot_mb']} MB, peak {row['rss_peak_mb']} MB; "
              f"statuses {row['statuses']}; slowest answer {row['max_s']} s (deadline {BIG_DEADLINE_S:g} s)")
        if row["budget_bytes"] is None:  # the goals are for the server as configured by default
            if row["rss_peak_mb"] >= 400:
                failures.append("big-body peak RSS >= 400 MB")
            if over:
                failures.append("big-body answer later than the deadline + 0.5 s")
            if any(k not in ("200", "429") for k in row["statuses"]):
                failures.append("big-body errors")
    if args.only == "big":
        print("goals: " + ("all met" if not failures else "MISSED: " + ", ".join(failures)))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
        return 1 if failures else 0
    print(f"upstream latency {args.latency}s + U(0, {args.jitter})s, {args.seconds}s per step, model {args.model!r}, "
          f"fd limit {out['fd_limit'][0]}, server env {out['server_env'] or 'default'}")
    print(fmt_table(out["steps"]))
    print(f"server RSS: boot {out['rss_boot_mb']} MB, after warm-up {out['rss_start_mb']} MB, peak {out['rss_peak_mb']} MB, "
          f"after the run + {args.idle:g}s idle {out['rss_end_mb']} MB ({out['rss_growth_pct']:+.1f}%); after each round "
          f"{out['rss_after_round_mb']} MB")
    print(f"server open fds: {out['fds_start']} before, {out['fds_after_run']} right after the run (idle pooled upstream "
          f"connections, <= max_connections), {out['fds_end']} after the idle")
    bp = out["backpressure"]
    print(f"back-pressure: {bp['clients']} clients vs limit {bp['limit']}: {bp['requests']} answered 200 (p99 {bp['p99_ms']} ms), "
          f"{bp['rejected_429']} got 429 (p99 {bp['p99_429_ms']} ms), {bp['errors']} errors")
    if any(r["errors"] for r in out["steps"]) or bp["errors"]:
        failures.append("errors")
    if abs(out["rss_growth_pct"]) > 10:
        failures.append("RSS did not return within 10%")
    if out["fds_end"] > out["fds_start"]:
        failures.append("fd growth")
    if not bp["rejected_429"]:
        failures.append("no 429 beyond the limit")
    print("goals: " + ("all met" if not failures else "MISSED: " + ", ".join(failures)))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
