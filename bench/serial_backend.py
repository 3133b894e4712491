"""A latency-bound stand-in model server: answers one request at a time, each after DELAY_MS (like one
``mlflow models serve`` process running a model on its one core)."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

RESPONSE = b'{"predictions": [0]}'


def main() -> None:
    port, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
    busy = asyncio.Lock()

    async def invocations(request: web.Request) -> web.Response:
        await request.read()
        async with busy:
            await asyncio.sleep(delay)
        return web.Response(body=RESPONSE, content_type="application/json")

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="\n")

    app = web.Application()
    app.router.add_post("/invocations", invocations)
    app.router.add_get("/ping", ping)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
