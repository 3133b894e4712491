"""The ``turnout`` console script."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar, get_type_hints

import click

from . import __version__
from .records import MAX_REPLICAS, HistoryEntry
from .settings import BOTH, ENV_PREFIX, GATEWAY, WORKER, Settings, SettingsError, base_type

F = TypeVar("F", bound=Callable[..., Any])


# Settings whose flag a command defines itself (a repeatable --deployment NAME=URI for ``deployments``).
OWN_FLAGS = {"deployments": "--deployment"}


def settings_in(*scopes: str) -> list[str]:
    """Names of the settings in any of the scopes (``both`` belongs to every command)."""
    wanted = {*scopes, BOTH}
    return [f.name for f in fields(Settings) if f.metadata.get("scope") in wanted and f.name not in OWN_FLAGS]


def settings_options(names: list[str]) -> Callable[[F], F]:
    """Add one ``--flag`` per named setting, typed and documented from :class:`Settings`."""
    hints = get_type_hints(Settings)
    by_name = {f.name: f for f in fields(Settings)}

    def decorate(func: F) -> F:
        for name in reversed(names):
            f = by_name[name]
            kind = base_type(hints[name])
            flag = "--" + name.replace("_", "-")
            help_text = f"{f.metadata.get('doc', '')} [env {ENV_PREFIX}{name.upper()}; default {f.default!r}]"
            if kind is bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
            else:
                option = click.option(flag, name, type=kind, default=None, help=help_text)
            func = option(func)
        return func

    return decorate


def load_settings(options: dict[str, Any]) -> Settings:
    """Flags over environment over defaults; a bad value is a usage error naming the setting."""
    try:
        return Settings.load(options)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None


def setup_logging(level: str, tag: str = "") -> None:
    """One line per event, on stderr (``tag`` after the logger's name: which gateway process of several)."""
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")




@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="turnout")
def main() -> None:
    """Turnout: blue/green traffic switching for MLflow model servers."""


@main.command()
@settings_options(settings_in(GATEWAY))
def gateway(**options: Any) -> None:
    """Run the data plane, admin API and metrics; any number of replicas against one Redis."""
    from .server import install_event_loop_policy, serve

    settings = load_settings(options)
    setup_logging(settings.log_level)
    install_event_loop_policy()
    if settings.process_count() == 1:
        asyncio.run(serve(settings))
        return
    from .processes import StartFailed, supervise

    try:
        status = asyncio.run(supervise(settings))
    except StartFailed as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


@main.command()
@click.option(
    "--deployment", "-d", "deployment_specs", multiple=True, metavar="[SERVICE/]NAME=MODEL_URI",
    help="A deployment to host, e.g. blue=models:/iris/1 or loans/blue=models:/loans/3 (repeatable; adds to "
         "TURNOUT_DEPLOYMENTS; without SERVICE/, the default service's).",
)
@settings_options(settings_in(WORKER))
def worker(deployment_specs: tuple[str, ...], **options: Any) -> None:
    """Launch and supervise warm `mlflow models serve` processes; report their health to Redis."""
    from gateway.records import parse_specs
    from gateway.server import install_event_loop_policy
    from workers.service import run_worker

    settings = load_settings(options)
    specs = [s for s in (settings.deployments, *deployment_specs) if s]
    try:
        parse_specs(specs, settings.default_service)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    settings = settings.replace(deployments=",".join(specs))
    if not settings.redis_url:
        raise click.UsageError(
            "a worker shares state with gateways through Redis: set --redis-url or TURNOUT_REDIS_URL "
            "(or run `turnout up` for gateway and worker in one process)"
        )
    if not settings.deployments and not settings.claim:
        raise click.UsageError("nothing to host: give --deployment NAME=MODEL_URI and/or --claim")
    setup_logging(settings.log_level)
    install_event_loop_policy()
    asyncio.run(run_worker(settings))


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".turnout/demo"),
              show_default=True, help="Where the demo's MLflow registry goes (recreated each run).")
@click.option("--quick", is_flag=True, help="Shorter phases (for CI).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the machine-readable summary to this file.")
def demo(workdir: Path, quick: bool, json_path: Path | None) -> None:
    """Register three versions of a model, keep them warm, switch under load, let the guard roll back a bad one."""
    from .demo import DemoFailed, print_summary, run_demo
    from .server import install_event_loop_policy

    setup_logging(os.environ.get("TURNOUT_LOG_LEVEL", "WARNING"))
    install_event_loop_policy()
    try:
        summary = asyncio.run(run_demo(workdir.resolve(), quick, json_path))
    except DemoFailed as exc:
        raise click.ClickException(f"demo failed: {exc}") from None
    print_summary(summary)
    if not summary["ok"] or summary["leftover_processes"]:
        raise click.ClickException("demo did not reach a green summary" + (
            f" (processes left behind: {summary['leftover_processes']})" if summary["leftover_processes"] else ""))


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path(".turnout/up"),
              show_default=True, help="Where the sample MLflow registry goes when MLFLOW_TRACKING_URI is unset.")
@settings_options(settings_in(GATEWAY, WORKER))
def up(workdir: Path, **options: Any) -> None:
    """Gateway + worker + model servers on this machine until Ctrl-C (embedded store unless --redis-url)."""
    from .demo import DemoFailed, run_up
    from .server import install_event_loop_policy

    settings = load_settings(options)
    if settings.process_count() > 1:
        raise click.UsageError("turnout up runs one gateway process: run turnout gateway --processes N for more")
    setup_logging(settings.log_level if options.get("log_level") else "WARNING")
    install_event_loop_policy()
    try:
        asyncio.run(run_up(workdir.resolve(), settings))
    except DemoFailed as exc:
        raise click.ClickException(str(exc)) from None


@main.command("register-samples")
@click.option("--model-name", default="iris-demo", show_default=True)
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", required=True,
              help="MLflow tracking server or database [env MLFLOW_TRACKING_URI].")
def register_samples(model_name: str, tracking_uri: str) -> None:
    """Register sample iris models (v1, v2 and a v3 that fails on a third of rows) unless the model already exists."""
    from workers.samples import register

    registry = register(tracking_uri, model_name)
    click.echo(f"{registry.model_name}: versions {', '.join(registry.versions)} in {tracking_uri}")


# --- the admin client commands -------------------------------------------------------------------

def _client_options(func: F) -> F:
    func = click.option("--service", "-s", envvar="TURNOUT_SERVICE", default=None, metavar="SERVICE",
                        help="The service to act on [env TURNOUT_SERVICE; default: the gateway's default service].")(func)
    func = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer (for scripts).")(func)
    func = click.option("--token", envvar="TURNOUT_ADMIN_TOKEN", default=None,
                        help="Admin bearer token [env TURNOUT_ADMIN_TOKEN].")(func)
    func = click.option("--url", envvar="TURNOUT_URL", default="http://127.0.0.1:8080", show_default=True,
                        help="Gateway (or its admin listener) URL [env TURNOUT_URL].")(func)
    return func


def _admin(service: str | None, tail: str) -> str:
    """The admin API path of a per-service resource: ``/admin/services/{service}{tail}``, or the default
    service's ``/admin{tail}`` when none is named."""
    return f"/admin/services/{service}{tail}" if service else f"/admin{tail}"


def _call(url: str, token: str | None, method: str, path: str, body: dict[str, Any] | None = None,
          query: dict[str, Any] | None = None) -> tuple[int, Any]:
    from .client import AdminClient, AdminUnreachable

    try:
        return AdminClient(url, token).call(method, path, body, query)
    except AdminUnreachable as exc:
        raise click.ClickException(f"{exc}; is `turnout gateway` running? (--url / TURNOUT_URL)") from None


def _finish(status: int, body: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """Print the answer; exit 1 when the gateway refused (4xx/5xx)."""
    if as_json:
        click.echo(json.dumps(body, indent=2))
    elif status < 400:
        click.echo(human(body))
        if isinstance(body, dict) and body.get("replicated") is False:
            click.echo(f"warning: {body.get('replication_warning', 'no Redis replica acknowledged this change')}", err=True)
    else:
        message = body.get("message", body) if isinstance(body, dict) else body
        hint = {401: " (give --token or TURNOUT_ADMIN_TOKEN)",
                403: "" if "token" in str(message).lower() else " (run the CLI without a browser Origin header)"}.get(status, "")
        click.echo(f"refused ({status}): {message}{hint}", err=True)
    if status >= 400:
        sys.exit(1)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


class _Cutter:
    """Shortens long cells for a terminal unless ``wide``, and remembers whether it did."""

    HINT = "(long details were cut: --wide shows them whole, --json gives everything)"

    def __init__(self, wide: bool) -> None:
        self.wide = wide
        self.cut = False

    def __call__(self, text: str, width: int) -> str:
        if self.wide or len(text) <= width:
            return text
        self.cut = True
        return text[: width - 1] + "…"

    def footer(self, text: str) -> str:
        return text + ("\n" + self.HINT if self.cut else "")


def _status_text(body: dict[str, Any], wide: bool = False) -> str:
    route = body["route"]
    split = f"  candidate={route['candidate']} at {route['weight']:g}%" if route.get("candidate") else ""
    lines = [f"route: active={route['active'] or '-'}  previous={route['previous'] or '-'}{split}  "
             f"generation={route['generation']}  (service {body.get('service', '-')})"]
    guard = body.get("guard") or {}
    if guard:
        lines.append("guard: " + ", ".join(f"{k}={_shown(v)}" for k, v in guard.items() if not isinstance(v, dict | list)))
        if guard.get("overrides"):
            lines.append("guard overrides (this service): " + ", ".join(f"{k}={v}" for k, v in guard["overrides"].items()))
    cut = _Cutter(wide)
    rows = [["NAME", "ROLE", "STATE", "MLFLOW", "URL", "REQ/60s", "ERR%", "P99 ms", "DETAIL"]]
    for d in body["deployments"]:
        m = d["mlflow"]
        mlflow = f"{m['name']}/{m['version']}" + (f"@{m['alias']}" if m.get("alias") else "") if m["name"] else "-"
        t = d["traffic"]
        replicas = d.get("replicas") or []
        where = d["url"] or "-"
        if len(replicas) > 1:
            where = f"{d.get('ready_replicas', '?')}/{d.get('desired_replicas', len(replicas))} replicas ready"
        rows.append([d["name"], d["role"] or "", d["state"] or "?", mlflow, where, str(t["requests"]),
                     f"{t['error_rate'] * 100:.1f}", _fmt_ms(t["p99_seconds"]), cut(d["state_detail"] or "", 70)])
        if len(replicas) > 1:
            # One line per replica under its deployment: where it is, its state, who hosts it, what this
            # gateway sent it.
            for r in replicas:
                state = r["state"] + (f" (ejected {r['ejections']}x)" if r["ejections"] else "")
                host = f"worker {r['worker']}; " if r.get("worker") else ""
                rows.append(["", "", state, f"  #{r.get('index', '')}", "  " + (r["url"] or "-"), "", "", "",
                             cut(f"{host}{r['answered']} answered, {r['inflight']} in flight (this gateway)", 70)])
    lines.append(_table(rows) if len(rows) > 1 else "no deployments yet: turnout deploy NAME MODEL_URI")
    if body.get("canary"):
        lines.append(_canary_text(body["canary"]))
    shadow = body.get("shadow")
    if shadow:
        report = shadow.get("report") or {}
        agreement = (report.get("agreement") or {}).get("rows")
        lines.append(f"shadow: {shadow['deployment']} ({shadow['state']}) on {shadow['percent']:g}% of {shadow['active']}'s requests"
                     + (f", agreeing on {agreement * 100:.1f}% of rows (this gateway replica; turnout compare for more)"
                        if agreement is not None else ""))
    return cut.footer("\n".join(lines))


def _canary_text(plan: dict[str, Any] | None, service: str | None = None) -> str:
    """A canary plan in a few lines: where it stands and the live gate against the baseline."""
    if not plan:
        return "no canary: start one with " + _cmd("canary", service, "NAME", "--steps", "5,25,50", "--step-seconds", "60")
    steps = " → ".join(f"{w:g}%" for w in plan["steps"])
    head = (f"canary: {plan['candidate']} vs {plan['baseline']}, {plan['state']}"
            + (f", step {plan['step']} of {len(plan['steps'])} at {plan['weight']:g}%, {plan['seconds_left']:.0f} s left"
               if plan["state"] in ("running", "paused") else "") + f" (steps {steps}"
            + (f", sticky on {plan['sticky_header']}" if plan.get("sticky_header") else "") + ")")
    lines = [head]
    live = plan.get("live") or plan.get("last_gate")
    if live and "candidate" in live:
        c, b = live["candidate"], live["baseline"]
        for side, who in (("candidate", c), ("baseline", b)):
            lines.append(f"  {side:9} {who['deployment']}: {who['judged_requests']} judged, "
                         f"{who['error_rate'] * 100:.1f}% errors, p99 {_fmt_ms(who['p99_seconds'])} ms")
        lines.append(f"  gate: errors ≤ baseline + {live['max_error_rate_increase'] * 100:g} points, "
                     f"p99 ≤ baseline × {live['max_latency_ratio']:g}, {live['min_requests']} requests each"
                     + (f" — {live['status']}: {live['detail']}" if "status" in live else ""))
    if plan.get("outcome"):
        lines.append(f"  {plan['state']}: {plan['outcome']}")
    return "\n".join(lines)


_WIDE = click.option("--wide", is_flag=True, help="Show long reasons and details whole.")
_WAIT = click.option("--wait", "wait_seconds", type=click.FloatRange(min=0), default=None, is_flag=False, flag_value=300.0,
                     metavar="[SECONDS]", help="Wait (up to SECONDS, default 300) until it is ready; exit 1 if it fails or time runs out.")


@main.command()
@_WIDE
@_client_options
def status(wide: bool, url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Show the route, every deployment with its state and recent traffic, and the guard."""
    code, body = _call(url, token, "GET", _admin(service, "/state"))
    _finish(code, body, as_json, lambda b: _status_text(b, wide))


@main.command()
@click.argument("name")
@click.argument("source")
@click.option("--mlflow-name", default=None, help="Registered model name of an external server (SOURCE is a URL).")
@click.option("--mlflow-version", default=None, help="Its registered version.")
@click.option("--replicas", type=click.IntRange(1, MAX_REPLICAS), default=None,
              help="Model-server processes for a model URI (default 1): workers run them, the gateway balances them.")
@click.option("--min-ready", type=click.IntRange(1, MAX_REPLICAS), default=None,
              help="Ready replicas needed before it may be switched to (default: all).")
@_WAIT
@_client_options
def deploy(name: str, source: str, mlflow_name: str | None, mlflow_version: str | None, replicas: int | None,
           min_ready: int | None, wait_seconds: float | None, url: str, token: str | None, as_json: bool,
           service: str | None) -> None:
    """Create deployment NAME from a model URI (a --claim worker serves it) or the http:// URL of a running
    server (several, comma-separated: replicas the gateway balances)."""
    body: dict[str, Any] = {"name": name}
    if replicas is not None:
        body["replicas"] = replicas
    if min_ready is not None:
        body["min_ready"] = min_ready
    if source.startswith(("http://", "https://")):
        urls = [part.strip() for part in source.split(",") if part.strip()]
        if len(urls) > 1:
            body["urls"] = urls
        else:
            body["url"] = urls[0] if urls else source
        if mlflow_name:
            body["mlflow_name"] = mlflow_name
        if mlflow_version:
            body["mlflow_version"] = mlflow_version
    else:
        body["model_uri"] = source
    code, answer = _call(url, token, "POST", _admin(service, "/deployments"), body)
    if wait_seconds is None or code >= 400:
        _finish(code, answer, as_json, lambda d: f"created {d['name']} ({d['state_detail']}); "
                f"watch it with `{_cmd('status', service)}`, then `{_cmd('switch', service, d['name'])}`")
        return
    code, answer = _wait_ready(url, token, service, name, wait_seconds, as_json)
    _finish(code, answer, as_json, lambda d: f"{d['name']} is ready; `{_cmd('switch', service, d['name'])}` sends traffic to it")


@main.command()
@click.argument("name")
@click.argument("replicas", type=click.IntRange(1, MAX_REPLICAS))
@click.option("--min-ready", type=click.IntRange(1, MAX_REPLICAS), default=None,
              help="Ready replicas needed before it may be switched to (default: unchanged).")
@click.option("--reason", default="", help="Why (recorded in the history).")
@_WAIT
@_client_options
def scale(name: str, replicas: int, min_ready: int | None, reason: str, wait_seconds: float | None, url: str,
          token: str | None, as_json: bool, service: str | None) -> None:
    """Run REPLICAS model servers for deployment NAME: new ones warm up before they take requests, removed
    ones drain (no new requests, those in flight finish) before they stop."""
    body: dict[str, Any] = {"replicas": replicas, **({"min_ready": min_ready} if min_ready is not None else {}),
                            **({"reason": reason} if reason else {})}
    code, answer = _call(url, token, "PUT", _admin(service, f"/deployments/{name}"), body)
    if wait_seconds is None or code >= 400:
        _finish(code, answer, as_json, lambda d: f"{d['name']}: {d['desired_replicas']} replica(s) wanted, "
                f"{d['ready_replicas']} ready now; watch them with `{_cmd('status', service)}`")
        return
    code, answer = _wait_scaled(url, token, service, name, replicas, wait_seconds, as_json)
    _finish(code, answer, as_json, lambda d: f"{d['name']}: {d['ready_replicas']} of {d['desired_replicas']} replicas ready")


def _wait_scaled(url: str, token: str | None, service: str | None, name: str, replicas: int, seconds: float,
                 quiet: bool) -> tuple[int, Any]:
    """Poll a deployment until exactly ``replicas`` replicas are ready and none is left draining."""

    def verdict(answer: dict[str, Any], late: bool) -> tuple[int, Any] | None:
        if answer.get("ready_replicas") == replicas and len(answer.get("replicas") or []) == replicas:
            return 200, answer
        failed = [r for r in (answer.get("replicas") or [])[:replicas] if r.get("state") == "failed"]
        if failed:
            why = next(iter((failed[0].get("reason") or "").splitlines()), "")
            return 409, {"message": f"{name}: replica {failed[0]['index']} failed: {why}"}
        if late:
            return 504, {"message": f"{name}: {answer.get('ready_replicas')} of {replicas} replicas ready after "
                         f"{seconds:g} s: {answer.get('state_detail')}"}
        return None

    return _poll(url, token, service, name, seconds, quiet, verdict,
                 lambda answer: ", ".join(f"#{r['index']} {r['state']}" for r in answer.get("replicas") or []))


def _weights(_ctx: click.Context, _param: click.Parameter, value: str) -> list[float]:
    try:
        return [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"give weights in percent separated by commas, e.g. 5,25,50 (got {value!r})") from None


@main.command()
@click.argument("name")
@click.option("--steps", required=True, callback=_weights, metavar="W1,W2,...",
              help="Weights in percent, increasing (e.g. 5,25,50); passing the last one promotes NAME.")
@click.option("--step-seconds", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Seconds each step holds its weight before the gate lets it move on.")
@click.option("--sticky-header", default=None, metavar="HEADER",
              help="Keep each user on one version: a hash of this header's value (e.g. X-User-Id) decides.")
@click.option("--max-error-rate-increase", type=float, default=None, help="Candidate failure rate allowed above the baseline's (default 0.01).")
@click.option("--max-latency-ratio", type=float, default=None, help="Candidate p99 allowed over the baseline's, as a ratio (default 1.5).")
@click.option("--min-requests", type=int, default=None, help="Judged requests each side needs before the gate judges (default 50).")
@click.option("--reason", default="", help="Why (recorded in the history).")
@_client_options
def canary(name: str, steps: list[float], step_seconds: float, sticky_header: str | None,
           max_error_rate_increase: float | None, max_latency_ratio: float | None, min_requests: int | None, reason: str,
           url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Roll NAME out gradually: each step's weight of requests goes to it, judged against the active deployment
    over the same seconds; every step passed promotes it, a breach aborts it at once."""
    body: dict[str, Any] = {"candidate": name, "steps": steps, "step_seconds": step_seconds}
    for key, value in (("sticky_header", sticky_header), ("max_error_rate_increase", max_error_rate_increase),
                       ("max_latency_ratio", max_latency_ratio), ("min_requests", min_requests)):
        if value is not None:
            body[key] = value
    if reason:
        body["reason"] = reason
    code, answer = _call(url, token, "POST", _admin(service, "/canary"), body)
    _finish(code, answer, as_json, lambda b: _canary_text(b["canary"], service) + f"\nwatch it with `{_cmd('status', service)}`")


def _canary_action(action: str, doc: str) -> None:
    @main.command(name=action, help=doc)
    @click.option("--reason", default="", help="Why (recorded in the history).")
    @_client_options
    def command(reason: str, url: str, token: str | None, as_json: bool, service: str | None) -> None:
        code, answer = _call(url, token, "POST", _admin(service, f"/canary/{action}"), {"reason": reason} if reason else {})
        _finish(code, answer, as_json, lambda b: _canary_text(b["canary"], service))


_canary_action("promote", "Make the running canary's candidate active now (its plan ends promoted).")
_canary_action("abort", "Stop the running canary: its candidate gets no more requests, at once.")
_canary_action("pause", "Hold the running canary at its current weight (a breach still aborts it).")
_canary_action("resume", "Go on with a paused canary from where it stopped.")


@main.command()
@click.argument("name", required=False)
@click.option("--percent", type=click.FloatRange(0, 100), default=None, help="Share of requests copied to NAME, in percent.")
@click.option("--off", is_flag=True, help="Stop shadowing.")
@click.option("--reason", default="", help="Why (recorded in the history).")
@_client_options
def shadow(name: str | None, percent: float | None, off: bool, reason: str, url: str, token: str | None, as_json: bool,
           service: str | None) -> None:
    """Copy a share of the requests the active deployment answers to deployment NAME (off the clients' path)
    and compare the two answers; `turnout compare` shows how they differ."""
    if off:
        if name is not None or percent is not None:
            raise click.UsageError("--off takes no NAME or --percent")
        code, answer = _call(url, token, "DELETE", _admin(service, "/shadow"), query={"reason": reason or None})
        _finish(code, answer, as_json, lambda b: f"stopped shadowing {b['stopped']}")
        return
    if name is None or percent is None:
        raise click.UsageError("give NAME and --percent (or --off)")
    body: dict[str, Any] = {"deployment": name, "percent": percent, **({"reason": reason} if reason else {})}
    code, answer = _call(url, token, "POST", _admin(service, "/shadow"), body)
    _finish(code, answer, as_json, lambda b: f"{name} shadows {b['shadow']['active']} on {percent:g}% of its requests; "
            f"`{_cmd('compare', service)}` compares their answers")


def _compare_text(body: dict[str, Any]) -> str:
    shadow = body.get("shadow")
    if not shadow:
        return "no shadow: start one with " + _cmd("shadow", body.get("service") if body.get("service") != "default" else None,
                                                   "NAME", "--percent", "20")
    report = shadow.get("report")
    head = f"shadow {shadow['deployment']} ({shadow['state']}) on {shadow['percent']:g}% of {shadow['active']}'s requests"
    if not report or not report["mirrored"]:
        return head + "\n  nothing compared yet (this gateway replica)" + (
            f"; dropped: {report['dropped']}" if report and report["dropped"] else "")
    a = report["agreement"]
    lines = [head, f"  compared on this gateway replica since {time.strftime('%H:%M:%S', time.localtime(report['since']))}: "
                   f"{report['mirrored']} requests {report['results']}" + (f", dropped {report['dropped']}" if report["dropped"] else "")]
    if a["requests"] is not None:
        lines.append(f"  agreement: {a['requests'] * 100:.1f}% of requests, "
                     + (f"{a['rows'] * 100:.1f}% of {a['rows_compared']} rows" if a["rows"] is not None else "no rows"))
    for flip in report["flips"]:
        lines.append(f"  class flip {flip['from_to']}: {flip['rows']} rows ({flip['share_of_rows'] * 100:.1f}%)")
    numeric = report["numeric"]
    if numeric["abs_difference"]:
        d = numeric["abs_difference"]
        lines.append(f"  numeric |difference| over {numeric['values_compared']} values: p50 {d['p50']:.3g}, "
                     f"p90 {d['p90']:.3g}, p99 {d['p99']:.3g}, max {d['max']:.3g}")
    lat = report["latency_seconds"]
    for side in ("active", "shadow"):
        if lat.get(side):
            lines.append(f"  latency {side}: p50 {lat[side]['p50'] * 1000:.1f} ms, p99 {lat[side]['p99'] * 1000:.1f} ms")
    rates = report["error_rates"]
    lines.append(f"  errors: active {(rates['active'] or 0) * 100:.1f}%, shadow {(rates['shadow'] or 0) * 100:.1f}%")
    for example in report["examples"][-3:]:
        lines.append(f"  e.g. {example['result']}: " + (f"active {example.get('active_answer')!s:.80} vs shadow "
                                                        f"{example.get('shadow_answer')!s:.80}" if "request" in example else
                                                        f"{example['rows_differ']} rows differ"))
    return "\n".join(lines)


@main.command()
@_client_options
def compare(url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """How the shadow's answers compare with the active's: agreement, class flips, numeric differences,
    latency and errors of both, and the last disagreements (this gateway replica's view)."""
    code, answer = _call(url, token, "GET", _admin(service, "/shadow"))
    _finish(code, answer, as_json, _compare_text)


def _cmd(command: str, service: str | None, *args: str) -> str:
    """A follow-up command to suggest, naming the service when one was given (pasted as shown, it must act
    on the same service)."""
    return " ".join(["turnout", command, *(["-s", service] if service else []), *args])


def _wait_ready(url: str, token: str | None, service: str | None, name: str, seconds: float,
                quiet: bool) -> tuple[int, Any]:
    """Poll a deployment until it is ready (its view, 200), failed or out of time (an error answer)."""

    def verdict(answer: dict[str, Any], late: bool) -> tuple[int, Any] | None:
        state = answer.get("state")
        if state == "ready":
            return 200, answer
        if state == "failed" or late:
            why = "failed" if state == "failed" else f"not ready after {seconds:g} s"
            return 504 if state != "failed" else 409, {"message": f"{name} {why}: {answer.get('state_detail')}"}
        return None

    return _poll(url, token, service, name, seconds, quiet, verdict, lambda answer: answer.get("state_detail") or "")


def _poll(url: str, token: str | None, service: str | None, name: str, seconds: float, quiet: bool,
          verdict: Callable[[dict[str, Any], bool], tuple[int, Any] | None], progress: Callable[[dict[str, Any]], str],
          ) -> tuple[int, Any]:
    """Read a deployment every half second until ``verdict`` (given whether time ran out) has an answer,
    printing ``progress`` to stderr whenever it changes."""
    import time

    deadline = time.monotonic() + seconds
    shown = ""
    while True:
        code, answer = _call(url, token, "GET", _admin(service, f"/deployments/{name}"))
        if code >= 400:
            return code, answer
        done = verdict(answer, time.monotonic() > deadline)
        if done is not None:
            return done
        line = progress(answer)
        if not quiet and line != shown:
            shown = line
            click.echo(f"{name}: {line}", err=True)
        time.sleep(0.5)


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even the active deployment or the rollback target.")
@click.option("--reason", default="", help="Why (recorded in the history).")
@_client_options
def undeploy(name: str, force: bool, reason: str, url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Delete deployment NAME (its worker stops the model server)."""
    code, body = _call(url, token, "DELETE", _admin(service, f"/deployments/{name}"), query={"force": str(force).lower(), "reason": reason or None})
    _finish(code, body, as_json, lambda d: f"deleted {d['deleted']}" + (f" from service {service}" if service else ""))


@main.command()
@click.argument("target")
@click.option("--reason", default="", help="Why (recorded in the history and the registry tags).")
@click.option("--expect-generation", type=int, default=None, help="Refuse unless the route is still at this generation.")
@click.option("--force", is_flag=True, help="Switch even if the target is not ready.")
@_client_options
def switch(target: str, reason: str, expect_generation: int | None, force: bool,
           url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Send all traffic to TARGET; the current active deployment stays warm as the rollback target."""
    body: dict[str, Any] = {"target": target, "reason": reason, "force": force}
    if expect_generation is not None:
        body["expected_generation"] = expect_generation
    code, answer = _call(url, token, "POST", _admin(service, "/switch"), body)
    _finish(code, answer, as_json, lambda d: d["message"] + (
        f"; roll back with `{_cmd('rollback', service)}`" if d.get("applied") and d["route"]["previous"] else ""))


@main.command()
@click.option("--reason", default="", help="Why (recorded in the history and the registry tags).")
@click.option("--expect-generation", type=int, default=None, help="Refuse unless the route is still at this generation.")
@click.option("--force", is_flag=True, help="Roll back even if the previous deployment is not ready.")
@_client_options
def rollback(reason: str, expect_generation: int | None, force: bool, url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Send traffic back to the previous deployment."""
    body: dict[str, Any] = {"reason": reason, "force": force}
    if expect_generation is not None:
        body["expected_generation"] = expect_generation
    code, answer = _call(url, token, "POST", _admin(service, "/rollback"), body)
    _finish(code, answer, as_json, lambda d: "rolled back: " + d["message"])


def _history_text(body: dict[str, Any], wide: bool = False) -> str:
    cut = _Cutter(wide)
    rows = [["TIME", "ACTION", "RESULT", "FROM", "TO", "GEN", "TRIGGER", "ACTOR", "REASON / DETAIL"]]
    for e in map(HistoryEntry.from_json, body["entries"]):
        detail = " — ".join(x for x in (e.reason, e.detail) if x)
        rows.append([e.time, e.action, e.result + (" (forced)" if e.forced else ""), e.source or "-", e.target or "-",
                     "-" if e.generation is None else str(e.generation), e.who.trigger, e.who.actor, cut(detail, 90)])
    more = f"\n({body['total']} entries; next page: --offset {body['next_offset']})" if body.get("next_offset") else ""
    return cut.footer((_table(rows) if len(rows) > 1 else "no history yet") + more)


@main.command()
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@_WIDE
@_client_options
def history(limit: int, offset: int, wide: bool, url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Every change and refused attempt, newest first."""
    code, body = _call(url, token, "GET", _admin(service, "/history"), query={"limit": limit, "offset": offset})
    _finish(code, body, as_json, lambda b: _history_text(b, wide))


def _services_text(body: dict[str, Any]) -> str:
    rows = [["SERVICE", "ACTIVE", "PREVIOUS", "GEN", "HEALTH", "DEPLOYMENTS", "GUARD"]]
    for svc in body["services"]:
        route, guard = svc["route"], svc["guard"]
        state = "latched" if guard.get("latched") else "paused" if guard.get("paused") else "on"
        if guard.get("overrides"):
            state += " (own thresholds)"
        rows.append([svc["name"] + (" (default)" if svc.get("default") else ""), route["active"] or "-",
                     route["previous"] or "-", str(route["generation"]), svc["health"], str(svc["deployments"]), state])
    return _table(rows)


@main.group(invoke_without_command=True)
@_client_options
@click.pass_context
def services(ctx: click.Context, url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """List services (one stable endpoint per model) with their active deployment, generation, health and
    guard; `services create NAME` and `services delete NAME` change them."""
    if ctx.invoked_subcommand is None:
        code, body = _call(url, token, "GET", "/admin/services")
        _finish(code, body, as_json, _services_text)


@services.command("create")
@click.argument("name")
@_client_options
def services_create(name: str, url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Create service NAME: its endpoint is /models/NAME/invocations."""
    code, body = _call(url, token, "POST", "/admin/services", {"name": name})
    _finish(code, body, as_json, lambda d: f"created service {d['name']}: deploy into it with `turnout deploy -s {d['name']} NAME MODEL_URI`")


@services.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete it with every deployment it still has.")
@click.option("--reason", default="", help="Why (recorded in the default service's history).")
@_client_options
def services_delete(name: str, force: bool, reason: str, url: str, token: str | None, as_json: bool,
                    service: str | None) -> None:
    """Delete service NAME (its workers stop its model servers)."""
    code, body = _call(url, token, "DELETE", f"/admin/services/{name}", query={"force": str(force).lower(), "reason": reason or None})
    _finish(code, body, as_json, lambda d: f"deleted service {d['deleted']}")


@main.command()
@click.option("--pause", "paused", flag_value=True, default=None, help="Stop automatic rollbacks of this service.")
@click.option("--resume", "paused", flag_value=False, help="Resume them (also lifts a latch after a rollback).")
@click.option("--error-rate", type=click.FloatRange(0, 1, min_open=True), default=None, help="This service's failure-rate threshold.")
@click.option("--p99", "p99_seconds", type=click.FloatRange(0, min_open=True), default=None, help="Its p99 threshold, in seconds.")
@click.option("--min-requests", type=click.IntRange(1), default=None, help="Judged requests needed to judge.")
@click.option("--window", "window_seconds", type=click.FloatRange(0, min_open=True), default=None, help="Seconds of traffic judged.")
@click.option("--bake", "bake_seconds", type=click.FloatRange(0, min_open=True), default=None, help="Seconds armed after a switch.")
@click.option("--reset", "reset", multiple=True, type=click.Choice(["enabled", "window_seconds", "error_rate", "min_requests",
              "p99_seconds", "bake_seconds", "always"]), help="Go back to the gateway's own value (repeatable).")
@click.option("--reason", default="", help="Why (recorded in the history).")
@_client_options
def guard(paused: bool | None, error_rate: float | None, p99_seconds: float | None, min_requests: int | None,
          window_seconds: float | None, bake_seconds: float | None, reset: tuple[str, ...], reason: str,
          url: str, token: str | None, as_json: bool, service: str | None) -> None:
    """Show a service's guard, pause or resume it, or set its own thresholds."""
    thresholds: dict[str, Any] = {k: v for k, v in {
        "error_rate": error_rate, "p99_seconds": p99_seconds, "min_requests": min_requests,
        "window_seconds": window_seconds, "bake_seconds": bake_seconds}.items() if v is not None}
    thresholds.update({name: None for name in reset})
    if paused is None and not thresholds:
        code, body = _call(url, token, "GET", _admin(service, "/guard"))
    else:
        request: dict[str, Any] = {"reason": reason}
        if paused is not None:
            request["paused"] = paused
        if thresholds:
            request["thresholds"] = thresholds
        code, body = _call(url, token, "POST", _admin(service, "/guard"), request)
    _finish(code, body, as_json, lambda d: "\n".join(f"{k}: {_shown(v)}" for k, v in d.items()))


def _shown(value: Any) -> str:
    """A JSON value as a person reads it: no Python ``None``/``True`` in the CLI's text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_shown(v)}" for k, v in value.items()) or "-"
    return str(value)


if __name__ == "__main__":
    main()
