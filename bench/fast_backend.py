"""A fast stand-in model server (aiohttp + uvloop): answers POST /invocations with fixed predictions."""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

RESPONSE = b'{"predictions": [0, 2, 1, 0, 2, 1, 0, 2]}'
CRASH = (b'{"error_code": "BAD_REQUEST", "message": "Encountered an unexpected error while evaluating the model. '
         b'Verify that the serialized input Dataframe is compatible with the model for inference.", "stack_trace": "..."}')
FAULT = {"ratio": 0.0, "credit": 0.0}


async def invocations(request: web.Request) -> web.Response:
    await request.read()
    FAULT["credit"] += FAULT["ratio"]
    if FAULT["credit"] >= 1.0:
        # Fails like a crashing MLflow model: HTTP 400 with a stack trace.
        FAULT["credit"] -= 1.0
        return web.Response(status=400, body=CRASH, content_type="application/json")
    return web.Response(body=RESPONSE, content_type="application/json")


async def fault(request: web.Request) -> web.Response:
    """POST /fault?ratio=0.3 makes that share of predictions fail from now on."""
    FAULT["ratio"] = float(request.query["ratio"])
    FAULT["credit"] = 0.0
    return web.Response(text="ok")


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="\n")


def main() -> None:
    app = web.Application()
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/ping", ping)
    app.router.add_post("/fault", fault)
    # An optional second argument: the address to listen on ("0.0.0.0" answers on every loopback address,
    # so several replica URLs can lead to one process).
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    web.run_app(app, host=host, port=int(sys.argv[1]), access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
