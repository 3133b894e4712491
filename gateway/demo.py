"""``turnout demo`` and ``turnout up``: the whole stack in one process — models registered in a local
MLflow registry, a worker keeping them warm, a gateway with its guard — on the embedded store unless
``TURNOUT_REDIS_URL`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from .client import AdminClient
from .loadgen import IRIS_COLUMNS, LoadGenerator, Phase, Result
from .local import free_port, processes_with_env
from .records import State
from .app import CONTROL, WATCHER
from .server import start_gateway, stop_on_signals
from .switching import Who
from .settings import Settings
from .store import RedisStore, Store, create_store


class DemoFailed(Exception):
    """A step of the demo did not do what it should; the message says which."""


class Progress:
    """Steps and a live counter on a terminal; plain lines elsewhere (CI logs)."""

    def __init__(self, quiet: bool = False) -> None:
        self.tty = sys.stdout.isatty()
        self.quiet = quiet
        self.started = time.monotonic()
        self._live = ""

    def step(self, text: str) -> None:
        """A new step."""
        if self.quiet:
            return
        self._clear()
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def live(self, text: str) -> None:
        """A status line that rewrites itself on a terminal."""
        if self.quiet or not self.tty:
            return
        self._live = text
        print("\r" + text.ljust(100)[:100], end="", flush=True)

    def _clear(self) -> None:
        if self._live and self.tty:
            print("\r" + " " * 100 + "\r", end="", flush=True)
            self._live = ""


class Stack:
    """Gateway + worker (+ its model servers) in this process, started and stopped as one."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.gateway: Any = None
        self.worker: Any = None

    async def start(self) -> None:
        """Gateway first (so it sees the deployments appear), then the worker."""
        from workers.supervisor import Worker

        self.gateway = await start_gateway(self.settings, store=self.store)
        self.worker = Worker(self.settings, self.store)
        await self.worker.start()

    async def stop(self) -> None:
        """Undo start in reverse: model servers first, then the gateway."""
        if self.worker is not None:
            await self.worker.stop()
        if self.gateway is not None:
            await self.gateway.stop()


async def wait_ready(
    store: Store, names: list[str], timeout: float, progress: Progress, stop: asyncio.Event | None = None
) -> dict[str, float]:
    """Wait until every named deployment is ready; returns seconds from launch to ready per deployment."""
    deadline = time.monotonic() + timeout
    while True:
        if stop is not None and stop.is_set():
            raise DemoFailed("interrupted")
        snapshot = await store.read_snapshot()
        states = {n: snapshot.effective_state(n) for n in names}
        if all(s is State.READY for s in states.values()):
            return {
                n: round((snapshot.deployments[n].ready_at or 0) - (snapshot.deployments[n].started_at or 0), 1)
                for n in names
            }
        failed = [n for n, s in states.items() if s is State.FAILED]
        if failed:
            raise DemoFailed(f"{failed[0]} failed to start: {snapshot.deployments[failed[0]].reason}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"not ready after {timeout:.0f} s: {states}")
        progress.live("  " + ", ".join(f"{n}: {s.value if s else '?'}" for n, s in states.items()))
        await asyncio.sleep(0.25)


async def _until(check: Callable[[], Any], timeout: float, what: str, stop: asyncio.Event | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if stop is not None and stop.is_set():
            raise DemoFailed("interrupted")
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _admin(client: AdminClient, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    status, answer = client.call(method, path, body)
    if status >= 400:
        raise DemoFailed(f"{method} {path} refused ({status}): {answer}")
    return answer


@contextlib.asynccontextmanager
async def demo_store(settings: Settings) -> AsyncIterator[Store]:
    """The embedded store, or Redis under a private namespace that is removed afterwards."""
    store = create_store(settings)
    try:
        yield store
    finally:
        if isinstance(store, RedisStore):
            await store.drop_namespace()
        await store.close()


@contextlib.contextmanager
def _quiet_logging() -> Any:
    import logging
    import warnings

    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _registry(workdir: Path, progress: Progress) -> Any:
    if workdir.exists():
        shutil.rmtree(workdir)
    progress.step(f"training and registering iris-demo v1, v2 and a faulty v3 in {workdir / 'mlflow.db'}")
    registry = build_samples_quietly(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = registry.tracking_uri
    return registry


def build_samples_quietly(workdir: Path) -> Any:
    """Train and register the sample models in ``workdir``. MLflow prints and warns a lot while logging
    models: that goes to ``workdir/registry.log``, not on the user's screen."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "registry.log", "w") as log_file, _output_to(log_file), _quiet_logging():
        # Imported here: defining the sample PythonModel already makes MLflow warn.
        from workers import samples

        return samples.build(workdir)


@contextlib.contextmanager
def _output_to(log_file: Any) -> Any:
    """Standard output and error into ``log_file``, down to file descriptors 1 and 2: MLflow runs
    subprocesses (requirement inference) that write to the inherited descriptors, not to ``sys.stderr``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log_file.fileno(), 1)
    os.dup2(log_file.fileno(), 2)
    try:
        with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


async def run_demo(workdir: Path, quick: bool, summary_path: Path | None, quiet: bool = False) -> dict[str, Any]:
    """The whole story; returns the summary (raises :class:`DemoFailed` when a step fails)."""
    progress = Progress(quiet)
    base = Settings.load()
    namespace = f"turnout-demo-{uuid.uuid4().hex[:8]}"
    port = free_port()
    token = secrets.token_urlsafe(16)
    phase_seconds = 2.0 if quick else 5.0
    settings = base.replace(
        namespace=namespace, host="127.0.0.1", port=port, admin_token=token, admin_port=None,
        deployments="v1=models:/iris-demo/1,v2=models:/iris-demo/2", claim=True,
        guard_window=5.0 if quick else 10.0, guard_interval=0.5, guard_min_requests=20,
        stats_flush_interval=0.25, lease_ttl=5.0,
    )
    registry = await asyncio.to_thread(_registry, workdir, progress)
    from workers.samples import iris_rows

    rows = iris_rows()
    url = f"http://127.0.0.1:{port}"
    client = AdminClient(url, token)
    summary: dict[str, Any] = {"store": "redis" if settings.redis_url else "embedded", "ok": False}
    stop = asyncio.Event()
    stop_on_signals(stop)
    async with demo_store(settings) as store:
        stack = Stack(settings, store)
        rng = random.Random(7)

        def iris_row(n: int) -> bytes:
            return json.dumps({"dataframe_split": {"columns": IRIS_COLUMNS, "data": [rng.choice(rows)]}}).encode()

        def show(load: LoadGenerator, result: Result) -> None:
            phase = load.phase
            progress.live(f"  requests: {load.total()}  phase {phase.name}: ok {sum(phase.served.values())}, failed {phase.failed}")

        load = LoadGenerator([url], rate=40.0, body=iris_row, on_result=show)
        try:
            progress.step(f"starting a gateway on {url} and a worker ({summary['store']} store)")
            await stack.start()
            progress.step("launching mlflow models serve for v1 and v2 (each proven with a warm-up prediction)")
            summary["time_to_ready_seconds"] = await wait_ready(store, ["v1", "v2"], 300, progress, stop)
            progress.step(f"v1 and v2 ready (launch → ready: {summary['time_to_ready_seconds']})")
            await asyncio.to_thread(_admin, client, "POST", "/admin/switch", {"target": "v1", "reason": "demo: first version"})
            await _wait_health(url, 10)
            await load.start()
            load.begin("v1")
            progress.step("traffic: steady predictions (40/s) on v1, with v2 shadowing it (a copy of every request)")
            await asyncio.to_thread(_admin, client, "POST", "/admin/shadow", {"deployment": "v2", "percent": 100,
                                                                               "reason": "demo: how does v2 differ?"})
            await _sleep_or_stop(phase_seconds, stop)
            compared = await asyncio.to_thread(_admin, client, "GET", "/admin/shadow")
            await asyncio.to_thread(_admin, client, "DELETE", "/admin/shadow")
            report = (compared.get("shadow") or {}).get("report") or {}
            agreement = report.get("agreement") or {}
            summary["shadow"] = {"requests": report.get("mirrored", 0), "results": report.get("results", {}),
                                 "row_agreement": agreement.get("rows"), "flips": report.get("flips", []),
                                 "dropped": report.get("dropped", {})}
            agreed = agreement.get("rows")
            progress.step(f"shadow: v2 agreed with v1 on {agreed * 100:.1f}% of {agreement.get('rows_compared')} rows"
                          if agreed is not None else "shadow: nothing compared")

            switch_phase = load.begin("switch v1 → v2")
            progress.step("switching v1 → v2 through the admin API while traffic flows")
            answer = await asyncio.to_thread(_admin, client, "POST", "/admin/switch", {"target": "v2", "reason": "demo: v2"})
            answered = time.monotonic()
            generation = answer["route"]["generation"]
            await _until(lambda: generation in load.generation_seen, 10, "traffic on v2", stop)
            summary["switch_propagation_ms"] = round(max(0.0, load.generation_seen[generation] - answered) * 1000, 2)
            await _sleep_or_stop(phase_seconds, stop)
            load.begin("v2")

            progress.step("deploying faulty v3 (raises on ~1/3 of rows) next to v2")
            await asyncio.to_thread(_admin, client, "POST", "/admin/deployments", {"name": "v3", "model_uri": "models:/iris-demo/3"})
            summary["time_to_ready_seconds"].update(await wait_ready(store, ["v3"], 300, progress, stop))

            canary_phase = load.begin("canary of faulty v3")
            progress.step("canary: 10% of requests to v3, judged against v2 over the same seconds")
            canary_from = len(load.results)
            await asyncio.to_thread(_admin, client, "POST", "/admin/canary", {
                "candidate": "v3", "steps": [10, 50], "step_seconds": 60, "min_requests": 15, "reason": "demo: canary of v3",
            })

            def plan_ended() -> bool:
                snapshot = stack.gateway.app[WATCHER].snapshots.get(settings.default_service) if stack.gateway else None
                return bool(snapshot and snapshot.plan and not snapshot.plan.active)

            await _until(plan_ended, 60, "the canary's gate to judge v3", stop)
            plan = stack.gateway.app[WATCHER].snapshots[settings.default_service].plan  # type: ignore[union-attr]
            seen = [r for r in load.results[canary_from:] if r.deployment == "v3"]
            summary["canary"] = {"state": plan.state, "outcome": plan.outcome, "v3_requests": len(seen),  # type: ignore[union-attr]
                                 "v3_failed": sum(r.status != 200 for r in seen),
                                 "requests": len(load.results) - canary_from}
            progress.step(f"canary {plan.state}: v3 saw {len(seen)} of {summary['canary']['requests']} requests; "  # type: ignore[union-attr]
                          f"{plan.outcome}")  # type: ignore[union-attr]

            fault_phase = load.begin("switch to faulty v3")
            progress.step("switching v2 → v3; the guard watches the error rate of the whole fleet")
            answer = await asyncio.to_thread(_admin, client, "POST", "/admin/switch", {"target": "v3", "reason": "demo: v3"})
            fault_at = time.monotonic()
            v3_generation = answer["route"]["generation"]

            def rolled_back() -> bool:
                return any(gen > v3_generation for gen in load.generation_seen)

            await _until(rolled_back, 60, "the guard to roll v3 back", stop)
            back_at = min(t for gen, t in load.generation_seen.items() if gen > v3_generation)
            summary["fault_to_rollback_seconds"] = round(back_at - fault_at, 2)
            progress.step(f"the guard rolled v3 back to v2 after {summary['fault_to_rollback_seconds']} s")
            load.begin("after rollback")
            await _sleep_or_stop(phase_seconds / 2, stop)
        finally:
            await load.stop()
            progress.step("stopping the gateway, the worker and every model server")
            history = (await store.read_history(0, 50))[0] if stack.gateway is not None else []
            await stack.stop()

        summary["phases"] = [
            {"name": p.name, "served": p.served, "failed": p.failed, "failures": p.failures[:5]} for p in load.phases
        ]
        summary["served_per_version"] = _per_version(load.phases)
        summary["client_errors_during_v1_to_v2_switch"] = switch_phase.failed
        summary["client_errors_during_fault"] = fault_phase.failed
        summary["history"] = [
            {k: e.to_json()[k] for k in ("time", "action", "result", "from", "to", "generation", "trigger", "actor", "reason")}
            for e in history if e.action in ("switch", "rollback", "deploy", "canary_start", "canary_abort", "shadow_on")
        ]
        summary["registry"] = await asyncio.to_thread(_registry_state, registry.model_name)
        rollback = next((e for e in history if e.action == "rollback" and e.result == "applied"), None)
        summary["guard_rolled_back"] = bool(rollback and rollback.who.trigger == "guard" and rollback.source == "v3")
        summary["client_errors_during_canary"] = canary_phase.failed
        summary["ok"] = (summary["guard_rolled_back"] and switch_phase.failed == 0
                         and summary.get("canary", {}).get("state") == "aborted")
    summary["leftover_processes"] = _leftovers(stack.worker.id if stack.worker is not None else None)
    if summary_path is not None:
        summary_path.write_text(json.dumps(summary, indent=2))
    return summary


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    if stop.is_set():
        raise DemoFailed("interrupted")


async def _wait_health(url: str, timeout: float) -> None:
    """Until the gateway reports ready (it runs on this event loop: never block it)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise DemoFailed(f"the gateway at {url} did not become ready in {timeout:.0f} s")


def _per_version(phases: list[Phase]) -> dict[str, int]:
    total: dict[str, int] = {}
    for phase in phases:
        for dep, n in phase.served.items():
            total[dep] = total.get(dep, 0) + n
    return total


def _registry_state(model_name: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    model = client.get_registered_model(model_name)
    versions = {}
    for v in client.search_model_versions(f"name = '{model_name}'"):
        full = client.get_model_version(model_name, v.version)
        versions[str(v.version)] = {k: val for k, val in full.tags.items() if k.startswith("turnout.")}
    return {"model": model_name, "aliases": dict(model.aliases), "tags": versions}


def _leftovers(worker_id: str | None) -> list[str]:
    """PIDs of processes the demo's worker started that are still alive: must be none."""
    if worker_id is None:
        return []
    return [str(pid) for pid, _ in processes_with_env(f"TURNOUT_WORKER_ID={worker_id}")]


def print_summary(summary: dict[str, Any]) -> None:
    """The human-readable end of the demo."""
    print()
    print("Summary")
    print(f"  store: {summary['store']}")
    print(f"  launch → ready: {summary.get('time_to_ready_seconds')}")
    print(f"  requests served per version: {summary.get('served_per_version')}")
    for p in summary.get("phases", []):
        print(f"  phase {p['name']!r}: served {p['served']}, client-visible failures {p['failed']}")
    print(f"  switch v1 → v2: first response from the new generation {summary.get('switch_propagation_ms')} ms after the admin call answered")
    shadow = summary.get("shadow") or {}
    if shadow.get("row_agreement") is not None:
        flips = ", ".join(f"{f['from_to']}: {f['rows']}" for f in shadow.get("flips", [])) or "none"
        print(f"  shadow v2 vs v1: agreed on {shadow['row_agreement'] * 100:.1f}% of rows over {shadow['requests']} "
              f"copied requests; class flips: {flips}")
    canary = summary.get("canary") or {}
    print(f"  canary of v3 at 10%: {canary.get('state')} after v3 saw {canary.get('v3_requests')} of "
          f"{canary.get('requests')} requests ({canary.get('v3_failed')} failed): {canary.get('outcome')}")
    print(f"  fault → rollback: {summary.get('fault_to_rollback_seconds')} s")
    print("  history (newest first):")
    for e in summary.get("history", []):
        print(f"    {e['time']}  {e['action']:<8} {e['result']:<8} {e.get('from') or '-'} → {e.get('to') or '-'}  "
              f"gen {e.get('generation') or '-'}  by {e['trigger']}  {(e.get('reason') or '')[:70]}")
    reg = summary.get("registry", {})
    print(f"  MLflow registry {reg.get('model')}: aliases {reg.get('aliases')}")
    for version, tags in sorted(reg.get("tags", {}).items()):
        print(f"    v{version}: {tags}")
    print()
    print("  RESULT: " + ("the canary gate stopped v3 at 10%, the guard rolled it back after a full switch, and the "
                          "v1 → v2 switch dropped nothing" if summary["ok"]
                          else "FAILED (see above)"))


async def run_up(workdir: Path, base: Settings, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Gateway + worker + model servers until Ctrl-C; prints how to use them."""
    token = base.admin_token or secrets.token_urlsafe(16)
    settings = base.replace(
        admin_token=token, claim=True,
        deployments=base.deployments or "blue=models:/iris-demo/1,green=models:/iris-demo/2",
    )
    progress = Progress()
    if "MLFLOW_TRACKING_URI" not in os.environ:
        if not (workdir / "mlflow.db").exists():
            progress.step(f"registering iris-demo v1, v2 and v3 in {workdir / 'mlflow.db'}")
            await asyncio.to_thread(build_samples_quietly, workdir)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    stop = asyncio.Event()
    stop_on_signals(stop)
    async with _kept(create_store(settings)) as store:
        stack = Stack(settings, store)
        try:
            await stack.start()
            names = sorted(name for _, name in stack.worker.static)
            progress.step(f"launching model servers for {', '.join(names)}")
            await wait_ready(store, names, 300, progress, stop)
            snapshot = await store.read_snapshot()
            if snapshot.route.active is None:
                # Like any other change: checked, timed, recorded, mirrored in the registry.
                await stack.gateway.app[CONTROL].switch(
                    names[0], Who(actor="turnout up", client=None, trigger="up"), reason="initial route"
                )
            url = f"http://{settings.host}:{settings.port}"
            info = {"url": url, "token": token, "deployments": names, "replicas": settings.replicas}
            _print_up(info, names)
            if ready is not None:
                ready(info)
            await stop.wait()
        finally:
            progress.step("stopping the gateway, the worker and every model server")
            await stack.stop()



@contextlib.asynccontextmanager
async def _kept(store: Store) -> AsyncIterator[Store]:
    try:
        yield store
    finally:
        await store.close()


def _print_up(info: dict[str, Any], names: list[str]) -> None:
    url, token = info["url"], info["token"]
    print(f"""
Turnout is up: {', '.join(names)} warm{f" ({info['replicas']} replicas each)" if info.get("replicas", 1) > 1 else ""}, {names[0]} active.
  predictions  {url}/invocations     (pinned: {url}/deployments/<name>/invocations)
  metrics      {url}/metrics
  admin API    {url}/admin/state     token: {token}

In another terminal (the README's "Try it by hand" goes on from here):
  export PATH="$PWD/.venv/bin:$PATH" TURNOUT_URL={url} TURNOUT_ADMIN_TOKEN={token}
  turnout status

Ctrl-C stops everything.
""", flush=True)
