"""`archon`: serve, run, validate, schema, import-archon — plus the subcommands of models, bench, search, specdec."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .config import SpecError, load_config
from .spec import dump_architecture, import_archon, json_schema, load_architecture, load_text

if TYPE_CHECKING:
    from .spec import ArchitectureSpec

# Subcommand groups contributed by other packages: command -> module exposing add_cli(subparsers).
_PLUGINS = {
    "models": "archon_server.engine.cli",
    "bench": "archon_server.bench.cli",
    "search": "archon_server.search.cli",
    "specdec": "archon_server.engine.specdec.cli",
}


def _die(msg: str, code: int = 2) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import build_app
    from .api.wire import uvicorn_io

    cfg = load_config(args.config)
    if args.architectures:
        cfg.architectures_dirs = list(args.architectures)
    host = args.host or cfg.server.host
    port = args.port if args.port is not None else cfg.server.port
    workers = args.workers
    if workers < 1:
        _die(f"--workers: must be >= 1, got {workers}")
    if args.shutdown_grace is not None:
        if args.shutdown_grace < 0:
            _die(f"--shutdown-grace: must be >= 0, got {args.shutdown_grace}")
        cfg.server.shutdown_grace_s = args.shutdown_grace
    if workers == 1:
        app = _checked(args, lambda: build_app(cfg))
        _announce(app, cfg, host, port)
        _settle_gc()
        uvicorn.run(app, host=host, port=port, log_level=args.log_level, timeout_graceful_shutdown=cfg.server.shutdown_grace_s,
                    **uvicorn_io())
        return 0
    return _serve_workers(args, cfg, host, port)


def _checked(args: argparse.Namespace, build: Any) -> Any:
    """``build()``; a config error found while building (one needing the architectures, as a default architecture
    that cannot be served) names the config file as load_config's do (main says it, exit 2)."""
    try:
        return build()
    except SpecError as e:
        raise SpecError(e.errors, e.source or args.config) from None


def _announce(app: Any, cfg: Any, host: str, port: int) -> None:
    print(f"archon-server on http://{host}:{port}/v1", flush=True)
    print(f"  architectures: {', '.join(app.state.catalog.names())}", flush=True)
    print(f"  backends: {', '.join(f'{b.alias} ({b.kind}: {b.model})' for b in cfg.backends)}", flush=True)
    if cfg.server.default_architecture:
        print(f"  default model: {cfg.server.default_architecture}", flush=True)


def _serve_workers(args: argparse.Namespace, cfg: Any, host: str, port: int) -> int:
    """``--workers N``: N uvicorn worker processes on one port, each with its own pools. ``/metrics`` sums all workers
    (prometheus_client's multiprocess mode, api/metrics.py); each keeps its requests' traces and answers the others
    for them, so /v1/traces and the console show all (api/traces/peers.py).
    Backends that live inside a server process (the embedded engine, managed vLLM) are not loaded N times: one
    backend host process runs them and every worker calls it (backends/shared.py), so requests of all workers
    meet in one engine and batch together."""
    import uvicorn

    from .api.app import build_app
    from .api.metrics import MULTIPROC_ENV
    from .api.wire import uvicorn_io
    from .backends.host import BackendHostFailed, BackendHostProcess
    from .backends.registry import IN_PROCESS_KINDS, build_registry

    hosted = [b.alias for b in cfg.backends if b.kind in IN_PROCESS_KINDS]
    # The workers' metrics directory is theirs: a managed vLLM under the host would write its own metrics into it.
    host_env = {k: v for k, v in os.environ.items() if k != MULTIPROC_ENV}
    backend_host = BackendHostProcess(args.config, env=host_env) if hosted else None
    socket = backend_host.socket if backend_host else None
    peers = tempfile.mkdtemp(prefix="archon-traces-")  # 0700: where the workers answer each other for their traces
    # The workers' metrics in one place (api/metrics.py); a directory the user set is theirs to keep and wipe.
    own_metrics_dir = None if os.environ.get(MULTIPROC_ENV) else tempfile.mkdtemp(prefix="archon-metrics-")
    if own_metrics_dir is not None:
        os.environ[MULTIPROC_ENV] = own_metrics_dir
    try:
        # A bad config fails here, once, before anything starts (the hosted backends' own options: in the host, below).
        app = _checked(args, lambda: build_app(cfg, build_registry(cfg, shared=socket)))
        _announce(app, cfg, host, port)
        print(f"  workers: {args.workers} (each with its own pools; /metrics and /v1/traces: of all workers)", flush=True)
        if backend_host is not None:
            try:
                backend_host.start()
            except BackendHostFailed as e:
                _die(f"--workers {args.workers}: {e}")
            print(f"  backend host: pid {backend_host.proc.pid if backend_host.proc else '?'} runs {', '.join(hosted)} "
                  f"once for all workers", flush=True)
        os.environ[_WORKER_ENV] = json.dumps({"config": args.config, "architectures": args.architectures, "shared": socket,
                                              "trace_peers": peers, "parent": os.getpid()})
        _settle_gc()
        uvicorn.run("archon_server.cli:worker_app", factory=True, workers=args.workers, host=host, port=port,
                    log_level=args.log_level, timeout_graceful_shutdown=cfg.server.shutdown_grace_s, **uvicorn_io())
    finally:
        if backend_host is not None:
            backend_host.stop()
        shutil.rmtree(peers, ignore_errors=True)
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    return 0


_WORKER_ENV = "ARCHON_SERVE_WORKER"  # `archon serve --workers N` -> each worker process: what to build


def worker_app() -> Any:
    """One `--workers` process's app (uvicorn's factory): the same config the parent checked, built here."""
    from .api.app import build_app
    from .backends.process import die_with_parent
    from .backends.registry import build_registry

    spec = json.loads(os.environ[_WORKER_ENV])
    # A worker outlives a parent killed with SIGKILL otherwise: it keeps the port, says /health ok, and its requests
    # hang on the backend host that died with the parent.
    die_with_parent(spec["parent"])
    cfg = load_config(spec["config"])
    if spec["architectures"]:
        cfg.architectures_dirs = list(spec["architectures"])
    app = build_app(cfg, build_registry(cfg, shared=spec["shared"]), trace_peers=spec["trace_peers"])
    _settle_gc()
    return app


# Youngest-generation threshold of the collector while serving (CPython's default: 700 allocations).
GC_GEN0_THRESHOLD = 20_000


def _settle_gc() -> None:
    """Before serving: everything built so far (modules, pydantic schemas, the catalog) lives as long as the server,
    so it is frozen out of the collector and the collections that request churn triggers do not walk it again and
    again. And the youngest generation is collected every 20,000 net allocations instead of 700: a request makes
    thousands of short-lived objects, nearly all freed by reference counting, and at 700 the collector ran several
    times per request. Measured with ``benchmarks/overhead.py --clients 200 --archs self-moa``, 3 runs each,
    alternating: server CPU per backend call 0.53-0.60 ms -> 0.47-0.53 ms, requests/s 795-893 -> 898-1010, peak RSS
    +9 MB."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def _resolve_arch(name: str, cfg: Any, registry: Any) -> "ArchitectureSpec":
    """A file, a catalog architecture or a backend alias (see graph.catalog.Catalog.resolve)."""
    from .graph.catalog import Catalog, UnknownArchitecture

    try:
        return Catalog(cfg.architectures_dirs, registry).resolve(name, files=True)
    except UnknownArchitecture as e:
        _die(str(e))


def cmd_run(args: argparse.Namespace) -> int:
    from .backends.registry import build_registry
    from .bench.sweep import SweepParams
    from .graph.runtime import GraphError, GraphRuntime

    # Only the fields given on the command line reach the final stage, as a sweep's params (SweepParams.final): the
    # rest stay the architecture's own (a full SamplingParams put its defaults, top_p 1.0..., over them).
    try:
        final = SweepParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed).final()
    except ValueError as e:  # pydantic's ValidationError: --max-tokens 0, --temperature -1
        _die("; ".join(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors()))
    cfg = load_config(args.config)
    reg = build_registry(cfg)
    spec = _resolve_arch(args.architecture or cfg.server.default_architecture or "self-moa", cfg, reg)
    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()

    async def main() -> int:
        await reg.start()
        try:
            res = await GraphRuntime(reg).run(spec, [{"role": "user", "content": prompt}], final=final)
        except GraphError as e:
            print(f"error ({e.status}): {e}", file=sys.stderr)
            if e.trace is not None and args.trace:
                print(json.dumps(e.trace.to_dict(), indent=2), file=sys.stderr)
            return 1
        finally:
            await reg.close()
        print(res.text)
        if args.trace:
            print(json.dumps(res.trace.to_dict(), indent=2), file=sys.stderr)
        return 0

    return asyncio.run(main())


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for f in args.files:
        try:
            data = load_text(Path(f).read_text(encoding="utf-8"), f)
            if isinstance(data, dict) and "backends" in data or args.config:
                load_config(f)
                print(f"{f}: valid server config")
            else:
                s = load_architecture(f)
                print(f"{f}: valid architecture {s.name!r} ({len(s.layers)} layers, <= {s.backend_calls_estimate()} calls/query)")
        except (SpecError, OSError) as e:
            bad += 1
            for line in (e.errors if isinstance(e, SpecError) else [str(e)]):
                print(f"{f}: {line}", file=sys.stderr)
    return 1 if bad else 0


def cmd_schema(args: argparse.Namespace) -> int:
    try:
        print(json_schema())
    except BrokenPipeError:  # `archon schema | head` is fine
        pass
    return 0


def cmd_import_archon(args: argparse.Namespace) -> int:
    try:
        data = json.loads(Path(args.file).read_text(encoding="utf-8"))
        spec = import_archon(data, args.file)
    except (OSError, ValueError) as e:
        if isinstance(e, SpecError):
            for line in e.errors:
                print(f"{args.file}: {line}", file=sys.stderr)
        else:
            print(f"{args.file}: {e}", file=sys.stderr)
        return 1
    text = dump_architecture(spec)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archon", description="OpenAI-compatible server for inference-time ensembles.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the HTTP server (no config: embedded SmolLM2 + presets)")
    s.add_argument("--config", "-c", help="server config YAML (backends, limits)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--architectures", action="append", help="folder of architecture files (repeatable)")
    s.add_argument("--log-level", default="info")
    s.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port (multi-core hosts); the embedded engine and managed vLLM run once, "
                        "in one backend host process all of them call")
    s.add_argument("--shutdown-grace", type=float, metavar="S",
                   help="on SIGTERM, seconds the requests in flight may go on before they are answered 503 "
                        "(default: the config's server.shutdown_grace_s, 5)")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("run", help="run one prompt through an architecture; prints the answer (and the trace)")
    r.add_argument("prompt", help="the prompt, or - for stdin")
    r.add_argument("--architecture", "-a", help="preset name or file (default: the config's default)")
    r.add_argument("--config", "-c")
    r.add_argument("--trace", action="store_true", help="print the trace as JSON on stderr")
    r.add_argument("--max-tokens", type=int, help="the final stage's max_tokens (default: the architecture's own)")
    r.add_argument("--temperature", type=float, help="the final stage's temperature (default: the architecture's own)")
    r.add_argument("--seed", type=int, help="the final stage's seed (default: none)")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="validate architecture (or --config server config) files")
    v.add_argument("files", nargs="+")
    v.add_argument("--config", action="store_true", help="treat the files as server configs")
    v.set_defaults(fn=cmd_validate)

    sc = sub.add_parser("schema", help="print the JSON Schema of architecture files")
    sc.set_defaults(fn=cmd_schema)

    im = sub.add_parser("import-archon", help="convert an Archon JSON config into our YAML")
    im.add_argument("file")
    im.add_argument("--output", "-o")
    im.set_defaults(fn=cmd_import_archon)

    for command, mod in _PLUGINS.items():
        try:
            m = importlib.import_module(mod)
        except ImportError as e:
            # A plugin whose dependencies are missing must not break the other commands, nor vanish: it stays listed,
            # and running it says why it cannot run.
            _unavailable(sub, command, f"{mod} failed to import: {type(e).__name__}: {e}")
            continue
        m.add_cli(sub)
    return p


def _unavailable(sub: Any, command: str, why: str) -> None:
    u = sub.add_parser(command, help=f"(unavailable: {why})", add_help=False)
    u.add_argument("rest", nargs=argparse.REMAINDER)

    def fail(_args: argparse.Namespace) -> int:
        _die(f"`archon {command}` is unavailable: {why}", code=1)

    u.set_defaults(fn=fail)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fn = getattr(args, "fn", None) or getattr(args, "func", None)  # plugins use either name
    if fn is None:
        build_parser().parse_args([*(argv or sys.argv[1:]), "--help"])
        return 2
    try:
        return int(fn(args) or 0)
    except SpecError as e:
        for line in e.errors:
            print(f"{e.source + ': ' if e.source else ''}{line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
