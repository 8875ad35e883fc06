"""Appservice mode's pure parts (SPEC §10): the registration and its checks, the generator,
the rule over pushed events, the inbox recording a transaction once, and /health while the
listener runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from adapter.matrix.config import Config, ConfigError, ListenAddr, Registration
from adapter.matrix.delivery.inbox import PREFIX, Inbox
from adapter.matrix.ingest.appservice import CATCHUP_MARGIN_MS, PushedIngest, pushed_updates
from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.health import LONG_POLL_S, Health
from adapter.matrix.store.records import APPSERVICE_KEY, SYNC_TOKEN_KEY, CaughtUp, MatrixStore
from core.store import SQLiteStore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from appservice import registration

BOT = "@lambda:example.org"


def write(tmp_path: Path, **overrides: object) -> Path:
    data = {**registration("http://127.0.0.1:29333", BOT, "lambda"), **overrides}
    path = tmp_path / "registration.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def env(path: Path, **extra: str) -> dict[str, str]:
    return {
        "MATRIX_HOMESERVER": "http://127.0.0.1:8008",
        "MATRIX_USER_ID": BOT,
        "LAMBDA_APPSERVICE": str(path),
        **extra,
    }


def test_the_generator_covers_the_bots_own_id_only_with_fresh_tokens():
    first, second = registration("http://h:1", BOT, "lambda"), registration("http://h:1", BOT, "x")
    assert first["as_token"] != second["as_token"] and first["as_token"] != first["hs_token"]
    [users] = first["namespaces"]["users"]
    assert users["exclusive"] is True and first["rate_limited"] is False
    assert re.match(users["regex"], BOT) and not re.match(users["regex"], "@lambda:exampleXorg")
    assert not re.match(users["regex"], BOT + "x") and not re.match(users["regex"], "@x" + BOT)
    assert first["sender_localpart"] == "lambda" and first["receive_ephemeral"] is False


def test_appservice_mode_needs_no_password_and_listens_on_the_urls_host_and_port(tmp_path):
    config = Config.from_env(env(write(tmp_path)))
    assert config.appservice is not None and config.password is None
    assert config.appservice_listen == ListenAddr("127.0.0.1", 29333)
    assert Config.from_env(config.to_env()) == config
    listen = Config.from_env(env(write(tmp_path), LAMBDA_APPSERVICE_LISTEN="0.0.0.0:8080"))
    assert listen.appservice_listen == ListenAddr("0.0.0.0", 8080)
    https = Config.from_env(env(write(tmp_path, url="https://bot.example.org")))
    assert https.appservice_listen == ListenAddr("bot.example.org", 443)


@pytest.mark.parametrize(
    "overrides, extra, says",
    [
        ({}, {"MATRIX_USER_ID": "@other:example.org"}, "must be the registration's sender"),
        ({"hs_token": None}, {}, "lacks hs_token"),
        ({"id": ""}, {}, "lacks id"),
        ({"url": "ftp://x"}, {}, "url must be an http(s) URL"),
        ({"url": None}, {}, "has no url"),
        ({"hs_token": "same", "as_token": "same"}, {}, "must differ"),
        ({}, {"LAMBDA_APPSERVICE_LISTEN": "nowhere"}, "LAMBDA_APPSERVICE_LISTEN must be"),
    ],
)
def test_a_registration_that_cannot_work_is_refused_clearly(tmp_path, overrides, extra, says):
    with pytest.raises(ConfigError, match=re.escape(says)) as err:
        Config.from_env(env(write(tmp_path, **overrides), **extra))
    assert "same" not in str(err.value).replace("must differ", "")  # no token printed


def test_a_registration_file_missing_or_not_yaml_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Config.from_env(env(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_env(env(bad))
    listen_alone = {**env(bad), "MATRIX_PASSWORD": "pw", "LAMBDA_APPSERVICE_LISTEN": "h:1"}
    del listen_alone["LAMBDA_APPSERVICE"]
    with pytest.raises(ConfigError, match="LAMBDA_APPSERVICE is not"):
        Config.from_env(listen_alone)


def ev(kind: str, **fields: object) -> dict:
    return {
        "type": kind,
        "room_id": "!r:x",
        "event_id": f"${kind}",
        "origin_server_ts": 10,
        **fields,
    }


def test_pushed_events_become_the_updates_sync_would_give():
    events = [
        ev("m.room.message", sender="@ann:x", content={"msgtype": "m.text", "body": "hi"}),
        ev("m.room.message", sender=BOT, content={"msgtype": "m.text", "body": "own"}),
        ev("m.room.member", sender="@ann:x", state_key=BOT, content={"membership": "invite"}),
        ev("m.room.member", sender="@ann:x", state_key="@ann:x", content={"membership": "join"}),
        {"type": "m.typing", "content": {}},  # no room id: not a room event
        "not an event",
    ]
    updates = pushed_updates(events, BOT)
    assert [(u.kind, u.sender, u.body, u.replayed) for u in updates] == [
        ("message", "@ann:x", "hi", False),
        ("invite", "@ann:x", "", False),
    ]
    assert updates[1].event_id == "invite|!r:x|$m.room.member"


def test_pushed_events_a_catch_up_may_have_read_are_replayed():
    ingest = PushedIngest(BOT)
    message = ev("m.room.message", sender="@ann:x", content={"msgtype": "m.text", "body": "hi"})
    elsewhere = {**message, "room_id": "!other:x"}
    assert not ingest.updates([message])[0].replayed  # no catch-up in this run
    ingest.catching_up()
    assert all(u.replayed for u in ingest.updates([message, elsewhere]))
    ingest.caught_up(now_ms=0, rooms={"!r:x"})
    assert ingest.updates([{**message, "origin_server_ts": CATCHUP_MARGIN_MS - 1}])[0].replayed
    assert not ingest.updates([{**message, "origin_server_ts": CATCHUP_MARGIN_MS}])[0].replayed
    assert not ingest.updates([elsewhere])[0].replayed  # no read back there


async def test_a_transaction_or_an_event_pushed_again_is_recorded_once(tmp_path):
    db = await SQLiteStore.open(tmp_path / "db")
    inbox, _ = await Inbox.open(db)
    one, two = (Update("message", "!r:x", "@ann:x", f"$e{n}", "hi") for n in (1, 2))
    assert len(await inbox.add_transaction("1", [one])) == 1
    assert await inbox.add_transaction("1", [one]) == []
    assert [e.update for e in await inbox.add_transaction("2", [one, two, two])] == [two]
    assert [u["update"]["event_id"] for _, u in await db.scan(PREFIX)] == ["$e1", "$e2"]
    await db.close()


async def test_the_catch_up_record_names_the_rooms_read_back_for_every_replica(store):
    records = MatrixStore(store)
    assert await records.appservice_caught_up() is None
    await store.set(SYNC_TOKEN_KEY, "s1")
    done = await records.mark_appservice_caught_up({"!b:x", "!a:x"})
    assert await records.appservice_caught_up() == done == CaughtUp(done.at, ("!a:x", "!b:x"))
    assert await store.get(SYNC_TOKEN_KEY) is None  # a move back to syncing catches up
    await store.set(APPSERVICE_KEY, {"at": 12.0})  # as recorded before it named rooms
    assert await records.appservice_caught_up() == CaughtUp(12.0, ())


def test_healthy_while_the_listener_runs_however_long_nothing_is_pushed():
    now = [0.0]
    health = Health(clock=lambda: now[0])
    health.listening()
    now[0] += 10 * (health.outage_after_s + LONG_POLL_S)
    assert health.report().ok
    health.homeserver_failed("unreachable")
    now[0] += health.outage_after_s + 1
    assert [p.reason for p in health.report().problems] == ["homeserver_failing"]


def test_registration_load_keeps_what_the_bot_uses(tmp_path):
    reg = Registration.load(write(tmp_path))
    assert (reg.id, reg.url, reg.sender_localpart) == ("lambda", "http://127.0.0.1:29333", "lambda")
