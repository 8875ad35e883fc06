"""What /health says (SPEC §9), from the state the sync loop and the store-fault paths keep,
over an injected clock."""

from __future__ import annotations

from adapter.matrix.observe.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reasons(health: Health) -> list[str]:
    return [p.reason for p in health.report().problems]


def test_unavailable_until_a_sync_round_is_recorded_then_ok():
    clock = Clock()
    health = Health(clock=clock)
    assert reasons(health) == ["not_syncing_yet"]
    assert health.report().to_json() == {
        "status": "unavailable",
        "last_sync_s": None,
        "problems": [
            {"reason": "not_syncing_yet", "detail": "the bot has not recorded a sync round yet"}
        ],
    }
    health.synced()
    clock.now += 2.5
    assert health.report().ok
    assert health.report().to_json() == {"status": "ok", "last_sync_s": 2.5}


def test_a_homeserver_failing_for_more_than_the_threshold_is_unavailable_until_it_answers():
    clock = Clock()
    health = Health(outage_after_s=30, clock=clock)
    health.synced()
    health.homeserver_failed("sync: 502 Bad Gateway")
    clock.now += 29
    health.homeserver_failed("sync: unreachable")  # the outage still started 29 s ago
    assert health.report().ok
    clock.now += 2
    [problem] = health.report().problems
    assert problem.reason == "homeserver_failing"
    assert problem.detail == "the homeserver has been failing for 31 s: sync: unreachable"
    health.homeserver_answered()
    assert health.report().ok


def test_a_homeserver_failing_before_the_first_sync_says_both():
    clock = Clock()
    health = Health(outage_after_s=30, clock=clock)
    health.homeserver_failed("login: unreachable")
    clock.now += 45
    assert reasons(health) == ["not_syncing_yet", "homeserver_failing"]


def test_a_refused_write_is_unavailable_until_a_sync_round_is_recorded():
    health = Health(clock=Clock())
    health.synced()
    health.store_refused("database or disk is full")
    assert health.store_refusing
    [problem] = health.report().problems
    assert problem.reason == "store_refuses_writes" and "disk is full" in problem.detail
    health.homeserver_answered()  # the homeserver answering does not make the DB write
    assert reasons(health) == ["store_refuses_writes"]
    health.synced()
    assert health.report().ok and not health.store_refusing


def test_the_threshold_is_thirty_seconds_by_default():
    clock = Clock()
    health = Health(clock=clock)
    health.synced()
    health.homeserver_failed("x")
    clock.now += 30
    assert health.report().ok
    clock.now += 0.5
    assert reasons(health) == ["homeserver_failing"]


def test_a_homeserver_that_hangs_is_failing_once_no_round_came_for_too_long():
    now = [0.0]
    health = Health(outage_after_s=30, clock=lambda: now[0])
    health.synced()
    now[0] = 59.0  # a long poll (30 s) and the outage threshold: still fine
    assert health.report().ok
    now[0] = 61.0
    [problem] = health.report().problems
    assert problem.reason == "homeserver_failing" and "no sync round" in problem.detail
