"""A small synchronous client of the admin API, for the CLI (and scripts)."""

from __future__ import annotations

import getpass
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminUnreachable(ConnectionError):
    """The gateway did not answer at all."""


class AdminClient:
    """Calls ``/admin/...`` with the bearer token and an actor header naming the user."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AdminUnreachable(f"the gateway URL must look like http://host:port, not {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        try:
            self.actor = f"{getpass.getuser()}@{socket.gethostname()}"
        except (KeyError, OSError):
            self.actor = "cli"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body) of one request; raises :class:`AdminUnreachable`."""
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json", "X-Turnout-Actor": self.actor}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, _decode(exc.read())
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminUnreachable(f"cannot reach the gateway at {self.url} ({reason})") from None


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"message": raw.decode(errors="replace")}
