"""A stand-in for `vllm serve` used by tests/test_vllm_process.py: same CLI flags we pass, same HTTP routes.

It answers /health, /v1/models and /v1/chat/completions (n choices echoing the
prompt, SSE when asked), prints a log line per request, and can fork a child
(--fork-child) so tests can check that the whole process group is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--served-model-name")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--fork-child", action="store_true")
    args, unknown = ap.parse_known_args()
    print(f"fake vllm pid={os.getpid()} unknown_args={unknown}", flush=True)
    if args.fork_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"child pid={child.pid}", flush=True)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": args.served_model_name, "object": "model"}]})

    async def chat(req: web.Request) -> web.StreamResponse:
        body = await req.json()
        print(f"request model={body.get('model')} n={body.get('n')} stream={body.get('stream')}", flush=True)
        if body.get("model") != args.served_model_name:
            return web.json_response({"error": {"message": f"model {body.get('model')} not found"}}, status=404)
        if body.get("temperature") == 0 and int(body.get("n", 1)) > 1:  # as vLLM does
            return web.json_response({"error": {"message": "n must be 1 when using greedy sampling"}}, status=400)
        text = f"echo:{body['messages'][-1]['content']}:pid={os.getpid()}"
        n = int(body.get("n", 1))
        if not body.get("stream"):
            return web.json_response(
                {
                    "model": args.served_model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"} for i in range(n)],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2 * n},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        for i in range(n):
            for piece in (text[:5], text[5:]):
                await resp.write(f"data: {json.dumps({'choices': [{'index': i, 'delta': {'content': piece}}]})}\n\n".encode())
            await resp.write(f"data: {json.dumps({'choices': [{'index': i, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n".encode())
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': {'prompt_tokens': 3, 'completion_tokens': 2 * n}})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.add_routes([web.get("/health", health), web.get("/v1/models", models), web.post("/v1/chat/completions", chat)])
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
