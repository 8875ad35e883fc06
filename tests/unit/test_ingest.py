"""The pure rules of ingest: which raw events become updates, and the catch-up rule."""

from __future__ import annotations

from adapter.matrix.ingest import catch_up, to_update

BOT, ALICE = "@lambda:x", "@alice:x"
NOW = 1_000_000_000


def text(event_id: str, body: str, sender: str = ALICE, ts: int = NOW, **content) -> dict:
    return {"type": "m.room.message", "event_id": event_id, "sender": sender,
            "origin_server_ts": ts, "room_id": "!r:x",
            "content": {"msgtype": "m.text", "body": body, **content}}


def reply(to: str | None, body: str = "Echo") -> dict:
    extra = {"io.lambda.source": to} if to else {}
    return text(f"$re-{to}-{body}", body, sender=BOT, msgtype="m.notice", **extra)


def test_to_update_keeps_text_renames_and_encrypted_but_never_the_bots_own():
    assert to_update(text("$1", "hi"), BOT).kind == "message"
    assert to_update(text("$1", "hi"), BOT).ts == NOW
    assert to_update(text("$2", "echo", sender=BOT), BOT) is None
    rename = {"type": "m.room.name", "state_key": "", "sender": ALICE, "event_id": "$3",
              "content": {"name": "New"}}
    assert to_update(rename, BOT).body == "New"
    assert to_update({"type": "m.room.encrypted", "sender": ALICE, "event_id": "$4",
                      "content": {}}, BOT).kind == "encrypted"
    for odd in ({"type": "m.room.message", "sender": ALICE, "content": "x"},
                {"type": "m.room.message", "sender": ALICE, "content": {"msgtype": "m.image"}},
                {"type": "m.reaction", "sender": ALICE, "content": {}}):
        assert to_update(odd, BOT) is None
    assert to_update(text("$5", "hi"), BOT, catchup=True).catchup


def test_catch_up_answers_only_unanswered_recent_messages_in_order():
    events = [text("$old", "too old", ts=NOW - 10), text("$a", "answered"), reply("$a"),
              text("$b", "unanswered 1"), text("$c", "unanswered 2")]
    answer, skipped = catch_up(events, BOT, not_before_ms=NOW - 5)
    assert [ev["event_id"] for ev in answer] == ["$b", "$c"]
    assert skipped == 2


def test_catch_up_counts_a_legacy_reply_without_source_as_answering_what_came_before():
    events = [text("$a", "before the upgrade"), reply(None, "old style answer"),
              text("$b", "after it")]
    answer, skipped = catch_up(events, BOT, not_before_ms=0)
    assert [ev["event_id"] for ev in answer] == ["$b"] and skipped == 1


def test_catch_up_answers_a_message_whose_reply_names_another_event():
    events = [text("$a", "one"), text("$b", "two"), reply("$b")]
    answer, _ = catch_up(events, BOT, not_before_ms=0)
    assert [ev["event_id"] for ev in answer] == ["$a"]
