"""Settings: flags over environment over defaults, with precise errors."""

from __future__ import annotations

import pytest

from gateway.settings import Settings, SettingsError


def test_defaults() -> None:
    s = Settings.load(env={})
    assert s.redis_url is None and s.namespace == "turnout" and s.port == 8080 and s.poll_interval == 1.0


def test_env_then_flags() -> None:
    env = {"TURNOUT_PORT": "9000", "TURNOUT_REDIS_URL": "redis://r:6379/1", "TURNOUT_REUSE_PORT": "yes"}
    s = Settings.load({"port": 9100, "namespace": None}, env=env)
    assert s.port == 9100, "a flag wins over the environment"
    assert s.redis_url == "redis://r:6379/1" and s.reuse_port is True
    assert s.namespace == "turnout", "an unset flag (None) leaves the lower layers alone"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TURNOUT_PORT": "eighty"}, "TURNOUT_PORT='eighty' is not a valid int"),
        ({"TURNOUT_REUSE_PORT": "maybe"}, "TURNOUT_REUSE_PORT='maybe' is not a valid bool"),
        ({"TURNOUT_PORT": "70000"}, "port out of range"),
        ({"TURNOUT_NAMESPACE": "a:b"}, "namespace must be"),
        ({"TURNOUT_READ_TIMEOUT": "0"}, "read_timeout must be positive"),
        ({"TURNOUT_POLL_INTERVAL": "nan"}, "poll_interval must be a finite number"),
        ({"TURNOUT_HEADER_TIMEOUT": "inf"}, "header_timeout must be a finite number"),
        ({"TURNOUT_GUARD_P99": "-inf"}, "guard_p99 must be a finite number"),
        ({"TURNOUT_REDIS_URL": "http://127.0.0.1:6379"}, "redis_url: a Redis URL starts with redis://"),
        ({"TURNOUT_REDIS_URL": "redis+sentinel://h1:26379"}, "needs /MASTER_NAME"),
        ({"TURNOUT_REDIS_URL": "redis+sentinel://h1:port/m"}, "invalid port"),
        ({"TURNOUT_REDIS_URL": "redis+sentinel://h1/m/zero"}, "database .* must be a number"),
        ({"TURNOUT_REDIS_URL": "redis+sentinel://h1/m?pasword=x"}, "unknown redis\\+sentinel:// URL option"),
        ({"TURNOUT_REDIS_WAIT_TIMEOUT": "2"}, "redis_wait_timeout must be at least 0 and below 2"),
        ({"TURNOUT_PROCESSES": "two"}, "processes must be a number or auto"),
        ({"TURNOUT_PROCESSES": "+2"}, "processes must be a number or auto"),
        ({"TURNOUT_PORT": "9000", "TURNOUT_ADMIN_PORT": "9000"}, "admin_port must differ from port"),
        ({"TURNOUT_PROCESSES": "0"}, "processes must be 1-256 or auto"),
        ({"TURNOUT_PROCESSES": "2"}, "processes=2 needs Redis"),
        ({"TURNOUT_PROCESSES": "2", "TURNOUT_REDIS_URL": "redis://r", "TURNOUT_PORT": "0"}, "need a fixed port"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.load(env=env)


def test_sentinel_urls_parse_with_passwords_and_defaults_and_never_show_a_password() -> None:
    from gateway.store.connect import parse_sentinel_url

    parsed = parse_sentinel_url("redis+sentinel://:s%40cret@h1:26380,h2,[::1]:26381/mymaster/3?sentinel_password=spw")
    assert parsed.sentinels == (("h1", 26380), ("h2", 26379), ("::1", 26381))
    assert (parsed.master, parsed.db, parsed.username, parsed.password, parsed.sentinel_password) == (
        "mymaster", 3, None, "s@cret", "spw")
    assert "s@cret" not in repr(parsed) and "spw" not in repr(parsed)
    assert parse_sentinel_url("redis+sentinel://h1/m?sentinel_password=a+b%26c").sentinel_password == "a+b&c"
    # Unencoded, a "/" or "?" in a password ends the host list early: the message must not show its first part.
    for url in ("redis+sentinel://:hunter2@h1/m/x", "redis+sentinel://user:hun/ter2@h1/m", "redis+sentinel://:hun?ter2@h1/m",
                "redis+sentinel://[::1]hunter2/m"):
        with pytest.raises(SettingsError) as info:
            Settings.load(env={"TURNOUT_REDIS_URL": url})
        assert "hun" not in str(info.value), str(info.value)
def test_processes_is_a_number_or_auto() -> None:
    import os

    assert Settings.load(env={}).process_count() == 1
    redis = {"TURNOUT_REDIS_URL": "redis://r:6379/0"}
    assert Settings.load({"processes": "3"}, env=redis).process_count() == 3
    assert Settings.load(env={**redis, "TURNOUT_PROCESSES": "auto"}).process_count() == (os.cpu_count() or 1)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(SettingsError, match="unknown setting 'prot'"):
        Settings.load({"prot": 1}, env={})


def test_reference_documents_every_setting() -> None:
    ref = Settings.reference()
    assert ("TURNOUT_NAMESPACE", "'turnout'") == ref[1][:2]
    assert all(doc for _, _, doc in ref)


def test_readme_documents_every_setting() -> None:
    from tests.support import ROOT

    readme = (ROOT / "README.md").read_text()
    missing = [env for env, _, _ in Settings.reference() if f"`{env}`" not in readme]
    assert missing == []


def test_every_setting_has_a_flag_on_each_command_of_its_scope() -> None:
    """Flags are generated from the settings' own metadata, so none can drift out of the CLI."""
    from dataclasses import fields

    from gateway.cli import OWN_FLAGS, main

    commands = {"gateway": {"gateway", "both"}, "worker": {"worker", "both"}, "up": {"gateway", "worker", "both"}}
    for command, scopes in commands.items():
        flags = {opt for param in main.commands[command].params for opt in param.opts}
        for f in fields(Settings):
            assert f.metadata["scope"] in ("gateway", "worker", "both"), f.name
            if f.metadata["scope"] not in scopes or (command == "up" and f.name in OWN_FLAGS):
                continue
            flag = OWN_FLAGS.get(f.name, "--" + f.name.replace("_", "-"))
            assert flag in flags, f"turnout {command} has no {flag} for the setting {f.name}"
