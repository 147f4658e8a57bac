"""A real teacher server for the endpoint tests: `kdcache serve`'s app under uvicorn, with faults injected in front.

    python -m tests.endpoint_server CHECKPOINT --port P [--plan plan.json] [--answer-log answers.jsonl]

The app is `pipeline.serve.app.TeacherApp` (what `kdcache serve` runs); `FaultApp` wraps it and, by a plan (JSON),
misbehaves on chosen `POST /v1/logits` requests (numbered from 1 in this process) without calling the app, so the
app's answer log holds exactly the answers a client received:

- ``"fail": [n, ...]``: answer HTTP 503 (with ``"retry_after": s``, a ``Retry-After`` header);
- ``"slow": [n, ...]``: wait ``"slow_s"`` seconds (longer than the client's timeout), then 504;
- ``"malformed": [n, ...]``: 200 with a body that is not npz;
- ``"die_at": n``: exit the process at once (a crash mid-run: the connection drops);
- ``"delay_s": s``: wait before every request (a slow, metered API);
- ``"width_from": n`` + ``"width": w``: from request n on, answer w logits per row (the app's, cut or padded);
- ``"fingerprint_from": n``: from request n on, another model fingerprint in the header;
- ``"html_info": true``: ``GET /v1/info`` answers an HTML page (a proxy's login page, a wrong URL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.wire import FINGERPRINT_HEADER, INFO_PATH, LOGITS_PATH, NPZ, decode_response, encode_response


class FaultApp:
    def __init__(self, app: Any, plan: dict[str, Any]) -> None:
        self.app, self.plan, self.n = app, plan, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/")
        if path == INFO_PATH and self.plan.get("html_info"):
            await _reply(send, 200, b"<!DOCTYPE html><html><body>Sign in</body></html>", "text/html")
            return
        if path != LOGITS_PATH:
            await self.app(scope, receive, send)
            return
        self.n += 1
        n, plan = self.n, self.plan
        if plan.get("die_at") == n:
            os._exit(17)
        await asyncio.sleep(float(plan.get("delay_s", 0)))
        if n in plan.get("fail", []):
            headers = [(b"retry-after", str(plan["retry_after"]).encode())] if "retry_after" in plan else []
            await _reply(send, 503, b'{"error": "overloaded"}', "application/json", headers)
            return
        if n in plan.get("slow", []):
            await asyncio.sleep(float(plan["slow_s"]))
            await _reply(send, 504, b'{"error": "too slow"}', "application/json")
            return
        if n in plan.get("malformed", []):
            fp = self.app.fingerprint.encode()  # the right model, a body cut short on the way
            await _reply(send, 200, b"\x00garbage, not an npz body", NPZ, [(FINGERPRINT_HEADER.encode(), fp)])
            return
        if n >= plan.get("width_from", 1 << 60) or n >= plan.get("fingerprint_from", 1 << 60):
            await self.app(scope, receive, _Rewrite(send, n, plan))
            return
        await self.app(scope, receive, send)


class _Rewrite:
    """Changes the app's answer: its logits' width, or the fingerprint header."""

    def __init__(self, send: Any, n: int, plan: dict[str, Any]) -> None:
        self.send, self.n, self.plan, self.start = send, n, plan, None

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        start = dict(self.start or {})
        body = message.get("body", b"")
        if start.get("status") == 200:
            headers = [(k, v) for k, v in start["headers"] if k not in (b"content-length", FINGERPRINT_HEADER.encode())]
            fp = dict(start["headers"])[FINGERPRINT_HEADER.encode()]
            if self.n >= self.plan.get("fingerprint_from", 1 << 60):
                fp = b"f" * 64
            if self.n >= self.plan.get("width_from", 1 << 60):
                ans = decode_response(body, "")
                w = int(self.plan["width"])
                logits = np.zeros((len(ans), w), np.float32)
                logits[:, : min(w, ans.data.shape[1])] = ans.data[:, :w]
                body = encode_response(ans.index, ans.view, logits)
            start["headers"] = [
                *headers,
                (FINGERPRINT_HEADER.encode(), fp),
                (b"content-length", str(len(body)).encode()),
            ]
        await self.send(start)
        await self.send({**message, "body": body})


async def _reply(send: Any, status: int, body: bytes, ctype: str, headers: list | None = None) -> None:
    head = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    import uvicorn

    from pipeline.serve.app import TeacherApp, load_served

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--plan", default=None)
    ap.add_argument("--answer-log", default=None)
    ap.add_argument("--max-batch", type=int, default=64)
    args = ap.parse_args()
    plan = json.loads(Path(args.plan).read_text()) if args.plan else {}
    model, rec = load_served(args.checkpoint)
    app = TeacherApp(
        model,
        rec["fingerprint"],
        rec["num_classes"],
        rec["in_channels"],
        rec["name"],
        args.max_batch,
        None,
        args.answer_log,
    )
    uvicorn.run(FaultApp(app, plan), host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
