"""Store contract: the same behaviour from the embedded store, fakeredis and the real Redis."""

from __future__ import annotations

import asyncio

import pytest

from gateway.records import Deployment, HistoryEntry, Route, State, Who
from gateway.store import EmbeddedStore, RedisStore, Store
from tests.support import eventually


def dep(name: str, **kw: object) -> Deployment:
    return Deployment(name=name, url=f"http://127.0.0.1:1/{name}", external=True, **kw)  # type: ignore[arg-type]


async def test_empty_store_has_no_route(any_store: Store) -> None:
    snapshot = await any_store.read_snapshot()
    assert snapshot.route == Route()
    assert dict(snapshot.deployments) == {}


async def test_create_read_update_delete(any_store: Store) -> None:
    assert await any_store.create_deployment(dep("blue", model_uri="models:/iris/1", mlflow_name="iris", mlflow_version="1"))
    assert not await any_store.create_deployment(dep("blue")), "a second create with the same name must fail"
    assert await any_store.update_deployment("blue", state=State.READY, reason="warm-up ok", restarts=2)
    snapshot = await any_store.read_snapshot()
    blue = snapshot.deployments["blue"]
    assert blue.state is State.READY and blue.reason == "warm-up ok" and blue.restarts == 2
    assert blue.mlflow_name == "iris" and blue.mlflow_version == "1" and blue.external
    assert snapshot.is_ready("blue")
    # None removes a field.
    assert await any_store.update_deployment("blue", mlflow_version=None)
    assert (await any_store.read_snapshot()).deployments["blue"].mlflow_version is None
    assert not await any_store.update_deployment("nobody", state=State.READY)
    with pytest.raises(ValueError):
        await any_store.update_deployment("blue", no_such_field=1)
    assert await any_store.delete_deployment("blue") is None
    assert await any_store.delete_deployment("blue") == "unknown"


async def test_set_route_generation_and_cas(any_store: Store) -> None:
    for name in ("blue", "green"):
        await any_store.create_deployment(dep(name, state=State.READY))
    first = await any_store.set_route("blue", None, expected_generation=0)
    assert first.ok and first.route == Route("blue", None, 1)
    second = await any_store.set_route("green", "blue", expected_generation=1)
    assert second.ok and second.route == Route("green", "blue", 2)
    stale = await any_store.set_route("blue", "green", expected_generation=1)
    assert not stale.ok and stale.refusal == "conflict" and stale.route == Route("green", "blue", 2)
    unknown = await any_store.set_route("nobody", "green")
    assert not unknown.ok and unknown.refusal == "unknown"
    assert (await any_store.get_route()) == Route("green", "blue", 2)


async def test_route_change_and_history_are_one_step(any_store: Store) -> None:
    await any_store.create_deployment(dep("blue"))
    who = Who("alice", "127.0.0.1", "api")
    await any_store.set_route("blue", None, history=HistoryEntry("switch", who, target="blue", time="t0"))
    refused = await any_store.set_route("blue", None, expected_generation=0, history=HistoryEntry("switch", who))
    assert not refused.ok
    entries, total = await any_store.read_history()
    assert total == 1, "a refused CAS must not write its history entry"
    assert entries[0] == HistoryEntry("switch", who, target="blue", generation=1, time="t0")


async def test_history_newest_first_paginated_and_bounded(any_store: Store) -> None:
    any_store.history_max = 5
    if isinstance(any_store, EmbeddedStore):
        any_store.__init__(history_max=5)  # type: ignore[misc]
    who = Who("bob", None, "api")
    for i in range(8):
        await any_store.append_history(HistoryEntry("switch", who, reason=str(i)))
    page, total = await any_store.read_history(offset=1, limit=2)
    assert total == 5
    assert [e.reason for e in page] == ["6", "5"]


def test_history_entries_round_trip_and_read_what_older_releases_wrote() -> None:
    entry = HistoryEntry("rollback", Who("turnout-guard", None, "guard"), result="applied", source="v3", target="v2",
                         generation=7, reason="error rate", forced=True, evidence={"requests": 40},
                         extra={"state": "starting"})
    assert HistoryEntry.from_json(entry.to_json()) == entry
    old = HistoryEntry.from_json({"action": "registry_sync", "result": "failed", "generation": 3, "retry": "in 1 s"})
    assert old.who.actor == "" and old.time == "" and old.extra == {"retry": "in 1 s"}


async def test_delete_refuses_active_and_previous_unless_forced(any_store: Store) -> None:
    for name in ("blue", "green"):
        await any_store.create_deployment(dep(name))
    await any_store.set_route("blue", None)
    await any_store.set_route("green", "blue")
    assert await any_store.delete_deployment("green") == "active"
    assert await any_store.delete_deployment("blue") == "previous"
    assert await any_store.delete_deployment("blue", force=True) is None
    assert "blue" not in (await any_store.read_snapshot()).deployments


async def test_leases_make_deployments_live(any_store: Store) -> None:
    await any_store.create_deployment(Deployment(name="w", url="http://127.0.0.1:1", state=State.READY))
    snapshot = await any_store.read_snapshot()
    assert not snapshot.is_ready("w"), "a worker-hosted deployment without a live lease is not ready"
    assert snapshot.effective_state("w") is State.UNHEALTHY
    assert await any_store.claim("w", "worker-a", ttl=5)
    assert not await any_store.claim("w", "worker-b", ttl=5), "a held lease cannot be taken by another worker"
    assert await any_store.claim("w", "worker-a", ttl=5), "the holder renews"
    assert (await any_store.read_snapshot()).is_ready("w")
    # Only the holder may write through the lease.
    assert not await any_store.update_deployment("w", owner="worker-b", state=State.FAILED)
    assert await any_store.update_deployment("w", owner="worker-a", reason="still fine")
    await any_store.release("w", "worker-b")
    assert (await any_store.read_snapshot()).is_ready("w"), "release by a non-holder does nothing"
    await any_store.release("w", "worker-a")
    assert not (await any_store.read_snapshot()).is_ready("w")
    assert await any_store.claim("w", "worker-b", ttl=5)


async def test_lease_expires(any_store: Store) -> None:
    await any_store.create_deployment(Deployment(name="w", url="http://127.0.0.1:1", state=State.READY))
    assert await any_store.claim("w", "worker-a", ttl=0.2)

    async def expired() -> bool:
        return not (await any_store.read_snapshot()).is_ready("w")

    await eventually(expired, timeout=5)
    assert await any_store.claim("w", "worker-b", ttl=5), "an expired lease is claimable"


async def test_events_announce_changes(any_store: Store) -> None:
    events = any_store.events()
    first = await anext(events)
    assert first == {"kind": "subscribed"}
    await any_store.create_deployment(dep("blue"))
    await any_store.set_route("blue", None)
    got = [await asyncio.wait_for(anext(events), 2), await asyncio.wait_for(anext(events), 2)]
    assert got == [{"kind": "deployment", "service": "default", "name": "blue"},
                   {"kind": "route", "service": "default", "generation": 1}]
    await events.aclose()


async def test_concurrent_switches_same_generation_one_wins_real_redis(redis_store_factory) -> None:  # type: ignore[no-untyped-def]
    """Twenty clients (each its own connection pool) race on one expected generation: exactly one wins."""
    stores = [redis_store_factory() for _ in range(20)]
    for name in ("blue", "green"):
        await stores[0].create_deployment(dep(name))
    await stores[0].set_route("blue", None)
    results = await asyncio.gather(
        *(s.set_route("green" if i % 2 else "blue", "x", expected_generation=1) for i, s in enumerate(stores))
    )
    assert sum(r.ok for r in results) == 1
    assert all(r.refusal == "conflict" for r in results if not r.ok)
    assert (await stores[0].get_route()).generation == 2


async def test_two_switches_race_one_conflicts_real_redis(redis_store_factory) -> None:  # type: ignore[no-untyped-def]
    a, b = redis_store_factory(), redis_store_factory()
    for name in ("blue", "green"):
        await a.create_deployment(dep(name))
    one, two = await asyncio.gather(
        a.set_route("blue", None, expected_generation=0), b.set_route("green", None, expected_generation=0)
    )
    assert sorted([one.ok, two.ok]) == [False, True]
    loser = one if not one.ok else two
    assert loser.refusal == "conflict" and loser.route.generation == 1


async def test_bad_record_fields_write_nothing(redis_store: RedisStore) -> None:
    await redis_store.create_deployment(dep("blue"))
    with pytest.raises(ValueError):
        await redis_store.update_deployment("blue", state=State.READY, bogus="x")
    assert (await redis_store.read_snapshot()).deployments["blue"].state is State.STARTING


async def test_a_change_resent_after_its_connection_broke_is_made_once_and_answered_as_made() -> None:
    """redis-py resends a command whose connection broke before the answer came (as Sentinel drops every
    client of a demoted primary). The switch below is cut off while it waits for a replica (WAIT, with none
    attached): its resend must answer "applied", not "conflict" with itself, and leave one history line."""
    import redis

    from tests.support import private_redis

    with private_redis() as server:
        store = RedisStore.from_url(server.url, "t")
        store.wait_timeout = 1.0  # as behind Sentinel: every change waits for a replica, here in vain
        killer = redis.Redis(port=server.port)
        try:
            for name in ("blue", "green"):
                await store.create_deployment(Deployment(name=name, url="http://127.0.0.1:1", state=State.READY, external=True))
            switch = asyncio.create_task(store.set_route("green", "blue", expected_generation=0, history=HistoryEntry(
                action="switch", who=Who(actor="t", client=None, trigger="api"), target="green")))
            await asyncio.sleep(0.3)
            assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
            change = await switch
            assert change.ok and change.route.generation == 1, change
            entries, total = await store.read_history()
            assert total == 1 and entries[0].generation == 1, entries
            assert (await store.read_snapshot()).route.generation == 1
        finally:
            killer.close()
            await store.close()


async def test_a_change_whose_answer_was_lost_says_it_may_have_been_made(redis_store: RedisStore,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection error before anything reached Redis: nothing changed. A read timeout after the change
    went out: the 503 must not say "nothing was changed"."""
    import redis.exceptions

    from gateway.store import StoreUnavailable

    async def lost(**_: object) -> None:
        raise redis.exceptions.TimeoutError("Timeout reading from 127.0.0.1:6379")

    async def refused(**_: object) -> None:
        raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    for script, uncertain in ((lost, True), (refused, False)):
        monkeypatch.setattr(redis_store, "_set_route", script)
        with pytest.raises(StoreUnavailable) as info:
            await redis_store.set_route("blue", None)
        assert info.value.uncertain is uncertain, info.value
