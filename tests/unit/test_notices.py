"""What the user is told when the bot cannot act now: refusal notices (at most one an hour
per room, none for invites or catch-up) and the one notice before a retry."""

from __future__ import annotations

import pytest
import structlog

from adapter.matrix.chain.notices import RefusalNotices, postpone
from adapter.matrix.healing.room_state import HealRefused
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import RetryLater
from tests.unit.fakes import MALLORY, FakeHomeserver, make_services, message

ROOM = "!shared:x"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_refusal_notice_at_most_once_an_hour_per_room():
    clock = Clock()
    notices = RefusalNotices(every_s=3600, clock=clock)
    assert notices.due(message(ROOM, "hi"))
    clock.now += 3599
    assert not notices.due(message(ROOM, "again"))
    assert notices.due(message("!other:x", "hi"))
    clock.now += 1
    assert notices.due(message(ROOM, "an hour later"))


def test_no_refusal_notice_for_an_invite_or_a_catchup_message():
    notices = RefusalNotices(clock=Clock())
    assert not notices.due(message(ROOM, "", kind="invite"))
    assert not notices.due(message(ROOM, "history", catchup=True))
    assert notices.due(message(ROOM, "live")), "neither started the room's hour"


async def test_the_refusal_notice_says_why_and_a_skipped_one_is_logged(store):
    hs = FakeHomeserver()
    svc = make_services(store, hs)
    notices = RefusalNotices(clock=Clock())
    refusal = HealRefused("shared_room")
    await notices.tell(message(ROOM, "hi", MALLORY), refusal, svc)
    with structlog.testing.capture_logs() as logs:
        await notices.tell(message(ROOM, "again", MALLORY, "$ev2"), refusal, svc)
    assert hs.bodies == [refusal.user_message]
    assert (hs.sent[0].txn_id or "").startswith("lambda-refusal-")
    assert [(e["event"], e["reason"]) for e in logs] == [("event.ignored", "shared_room")]


@pytest.mark.parametrize(
    "kind,attempt,told", [("message", 0, True), ("message", 1, False), ("invite", 0, False)]
)
async def test_postpone_tells_once_then_hands_the_update_back(store, kind, attempt, told):
    hs = FakeHomeserver()
    svc = make_services(store, hs)
    err = HomeserverError("get state", "M_LIMIT_EXCEEDED", "slow down", retry_after_ms=2500)
    with pytest.raises(RetryLater) as raised:
        await postpone(message(ROOM, "hi", kind=kind, attempt=attempt), err, svc, "I'll retry.")
    assert raised.value.retry_after_ms == 2500 and raised.value.__cause__ is err
    # A rate limit says when, whatever the caller's notice for a failure.
    assert hs.bodies == (
        ["The homeserver is rate-limiting me. I'll retry in 2 s and answer you then."]
        if told
        else []
    )


async def test_postpone_tells_the_callers_notice_when_the_homeserver_failed(store):
    hs = FakeHomeserver()
    svc = make_services(store, hs)
    with pytest.raises(RetryLater):
        await postpone(
            message(ROOM, "hi"), HomeserverError("x", "unreachable", ""), svc, "I'll retry."
        )
    assert hs.bodies == ["I'll retry."]


async def test_postpone_still_hands_back_when_even_the_notice_fails(store):
    hs = FakeHomeserver()
    hs.fail["send"] = HomeserverError("send message", "unreachable", "")
    svc = make_services(store, hs)
    with pytest.raises(RetryLater):
        await postpone(message(ROOM, "hi"), HomeserverError("x", "unreachable", ""), svc, "…")
