"""Server instructions per request, counted by valgrind: a figure that does not move with the machine's load.

CPU time per request on shared cores moves ±15% from run to run and more from day to day (the same tree measured
0.26 ms per backend call one day and 0.32 the next), so a 5% change cannot be seen in ``benchmarks/overhead.py``
without many alternating runs. This script runs ``archon serve`` under ``valgrind --tool=cachegrind`` (user-space
instructions only: the kernel's share, ~10% of the server's CPU here, is not counted), with the fake upstream and the
clients running natively, twice: once with a warm-up only and once with ``--requests`` more per client; the
difference divided by the extra requests is the server's instructions per request, start-up excluded. Repeated runs
of one tree on a quiet machine agree within ~1-2%; other jobs on the cores shift the count by up to ~6% (the server
then handles more requests per event-loop turn), so compare trees in one run, as this script does.

    python benchmarks/instructions.py [--arch self-moa] [--clients 100] [--requests 10] [CHECKOUT ...]

Each CHECKOUT (default: this one) is measured from its own directory; with several, each line also gives the ratio
to the first. Needs ``valgrind`` (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import overhead  # noqa: E402  (the fake upstream, PRESET_ALIASES and the wait helper: one copy)


async def _load(url: str, arch: str, clients: int, per_client: int) -> None:
    """``clients`` workers, ``per_client`` requests each, every answer read; anything but 200 is an error."""
    conn = aiohttp.TCPConnector(limit=clients + 8)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=900)) as s:

        async def worker(i: int) -> None:
            for k in range(per_client):
                body = {"model": arch, "messages": [{"role": "user", "content": f"client {i} request {k}"}], "return_trace": True}
                async with s.post(url + "/v1/chat/completions", json=body) as r:
                    if r.status != 200:
                        raise RuntimeError(f"status {r.status}: {await r.text()}")
                    await r.read()

        await asyncio.gather(*(worker(i) for i in range(clients)))


def _instructions(tree: Path, cfg: str, arch: str, clients: int, per_client: int, out_dir: str) -> int:
    """Instructions the server ran from start to exit, having answered a warm-up plus ``per_client`` per client."""
    port = overhead.free_port()
    out = os.path.join(out_dir, f"cachegrind.{os.getpid()}.{per_client}")
    python = os.path.realpath(sys.executable)  # the interpreter itself, not a wrapper script valgrind would trace
    env = {**os.environ, "PYTHONPATH": str(tree)}
    srv = subprocess.Popen(["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}", python, "-m",
                            "archon_server", "serve", "-c", cfg, "--port", str(port), "--log-level", "warning"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tree)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(overhead.wait_http(url + "/health", timeout=900))
        asyncio.run(_load(url, arch, clients, 1))  # warm-up: first-call costs land in both runs alike
        if per_client:
            asyncio.run(_load(url, arch, clients, per_client))
    finally:
        srv.terminate()
        srv.wait()
    with open(out) as f:
        return int(next(line for line in f if line.startswith("summary:")).split()[1])


def measure(tree: Path, arch: str, clients: int, per_client: int) -> float:
    """Server instructions per ``arch`` request of ``tree``'s package, against a 50 ms fake upstream."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    up_port = overhead.free_port()
    upstream = subprocess.Popen([sys.executable, "-c", overhead.UPSTREAM, "0.05", str(up_port), "0"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env, cwd=tree)
    tmp = tempfile.mkdtemp(prefix="archon-instr-")
    try:
        assert upstream.stdout is not None
        upstream.stdout.readline()
        cfg = os.path.join(tmp, "config.json")
        with open(cfg, "w") as f:
            json.dump({"backends": [{"alias": "fake", "kind": "openai", "model": "fake", "urls": [f"http://127.0.0.1:{up_port}/v1"],
                                     "aliases": overhead.PRESET_ALIASES, "max_connections": 4096}],
                       "architectures_dirs": [str(tree / "architectures")], "server": {"max_concurrent_requests": 10_000}}, f)
        base = _instructions(tree, cfg, arch, clients, 0, tmp)
        more = _instructions(tree, cfg, arch, clients, per_client, tmp)
        return (more - base) / (clients * per_client)
    finally:
        upstream.terminate()
        upstream.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="*", default=[str(ROOT)], help="trees to measure (each with its own archon_server/)")
    ap.add_argument("--arch", default="self-moa")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=10, help="measured requests per client (after one warm-up each)")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    print(f"server instructions per {a.arch} request ({a.clients} clients, {a.requests} requests each, 50 ms fake upstream; "
          "user space only, counted by cachegrind)")
    first = None
    for c in a.checkouts:
        tree = Path(c).resolve()
        per = measure(tree, a.arch, a.clients, a.requests)
        first = first or per
        print(f"{str(tree):40} {per:12,.0f}  {per / first:6.3f}x the first", flush=True)


if __name__ == "__main__":
    main()
