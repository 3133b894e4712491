"""The ``turnout`` console script."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar, get_type_hints

import click

from . import __version__
from .settings import ENV_PREFIX, Settings, SettingsError, base_type

F = TypeVar("F", bound=Callable[..., Any])


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


def setup_logging(level: str) -> None:
    """One line per event, on stderr."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


GATEWAY_SETTINGS = [
    "redis_url", "namespace", "host", "port", "reuse_port",
    "poll_interval", "connect_timeout", "read_timeout", "total_timeout", "upstream_keepalive",
    "upstream_max_connections", "max_body_bytes", "shutdown_timeout", "log_level",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="turnout")
def main() -> None:
    """Turnout: blue/green traffic switching for MLflow model servers."""


@main.command()
@settings_options(GATEWAY_SETTINGS)
def gateway(**options: Any) -> None:
    """Run the data plane and its metrics; any number of replicas against one Redis."""
    from .server import install_event_loop_policy, serve

    settings = load_settings(options)
    setup_logging(settings.log_level)
    install_event_loop_policy()
    asyncio.run(serve(settings))


WORKER_SETTINGS = [
    "redis_url", "namespace", "claim", "model_host", "advertise_host", "model_ports", "health_interval",
    "lease_ttl", "start_timeout", "max_start_attempts", "restart_backoff", "stop_timeout", "warmup_payload",
    "worker_metrics_port", "log_level",
]


@main.command()
@click.option(
    "--deployment", "-d", "deployment_specs", multiple=True, metavar="NAME=MODEL_URI",
    help="A deployment to host, e.g. blue=models:/iris/1 (repeatable; adds to TURNOUT_DEPLOYMENTS).",
)
@settings_options(WORKER_SETTINGS)
def worker(deployment_specs: tuple[str, ...], **options: Any) -> None:
    """Launch and supervise warm `mlflow models serve` processes; report their health to Redis."""
    from gateway.records import parse_specs
    from gateway.server import install_event_loop_policy
    from workers.service import run_worker

    settings = load_settings(options)
    specs = [s for s in (settings.deployments, *deployment_specs) if s]
    try:
        parse_specs(specs)
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


if __name__ == "__main__":
    main()
