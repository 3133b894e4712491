"""A fast stand-in model server (aiohttp + uvloop): answers POST /invocations with fixed predictions."""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

RESPONSE = b'{"predictions": [0, 2, 1, 0, 2, 1, 0, 2]}'
CRASH = (b'{"error_code": "BAD_REQUEST", "message": "Encountered an unexpected error while evaluating the model. '
         b'Verify that the serialized input Dataframe is compatible with the model for inference.", "stack_trace": "..."}')
INTERNAL = b'{"error_code": "INTERNAL_ERROR", "message": "the model server failed"}'
FAULT = {"ratio": 0.0, "credit": 0.0, "status": 400}


async def invocations(request: web.Request) -> web.Response:
    await request.read()
    FAULT["credit"] += FAULT["ratio"]
    if FAULT["credit"] >= 1.0:
        # Fails like a crashing MLflow model (HTTP 400 with a stack trace), or with a 500.
        FAULT["credit"] -= 1.0
        status = int(FAULT["status"])
        return web.Response(status=status, body=CRASH if status == 400 else INTERNAL, content_type="application/json")
    return web.Response(body=RESPONSE, content_type="application/json")


async def fault(request: web.Request) -> web.Response:
    """POST /fault?ratio=0.3 makes that share of predictions fail from now on (``&status=500``: with a 500
    instead of MLflow's 400 for an exception in the model)."""
    FAULT["ratio"] = float(request.query["ratio"])
    FAULT["status"] = int(request.query.get("status", "400"))
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
