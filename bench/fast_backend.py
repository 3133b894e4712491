"""A fast stand-in model server (aiohttp + uvloop): answers POST /invocations with fixed predictions."""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

RESPONSE = b'{"predictions": [0, 2, 1, 0, 2, 1, 0, 2]}'


async def invocations(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=RESPONSE, content_type="application/json")


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="\n")


def main() -> None:
    app = web.Application()
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/ping", ping)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
