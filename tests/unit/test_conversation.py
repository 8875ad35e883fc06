"""The conversation without a homeserver: the pure reader over plain event dicts, the
Markdown renderer, which agents get history, and the cache's one read per room."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from adapter.matrix.conversation.history import Conversations
from adapter.matrix.conversation.markdown import render
from adapter.matrix.conversation.turns import conversation_turns, history_before, slim
from adapter.matrix.ingest.catchup import catch_up
from adapter.matrix.ingest.events import to_update
from adapter.matrix.vocabulary.content import message_content
from core.agent import EchoAgent, Turn, wants_history

BOT, ALICE, BOB = "@lambda:x", "@alice:x", "@bob:x"


def said(event_id: str, body: str, sender: str = ALICE, ts: int = 0, **content) -> dict:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": sender,
        "origin_server_ts": ts,
        "content": {"msgtype": "m.text", "body": body, **content},
    }


def answer(event_id: str, body: str, source: str, **options) -> dict:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "sender": BOT,
        "origin_server_ts": 0,
        "content": message_content(body, source_event_id=source, **options),
    }


def edit(event_id: str, target: str, body: str, sender: str = ALICE) -> dict:
    content: dict[str, Any] = {
        "m.new_content": {"msgtype": "m.text", "body": body},
        "m.relates_to": {"rel_type": "m.replace", "event_id": target},
    }
    return said(event_id, f"* {body}", sender, **content)


def texts(turns: list[Turn]) -> list[tuple[str, str]]:
    return [(turn.role, turn.text) for turn in turns]


def test_turns_are_the_owners_messages_and_the_answers_to_them():
    events = [
        said("$1", "hello"),
        answer("$2", "Hi!", "$1", notice=False),
        said("$3", "!chats"),
        answer("$4", "Your chats: ...", "$3"),
        said("$5", "I am Bob", BOB),
        answer("$6", "I'll retry", "$7", provisional=True),
        said("$7", "how are you?"),
    ]
    assert texts(conversation_turns(events, ALICE, BOT)) == [
        ("user", "hello"),
        ("assistant", "Hi!"),
        ("user", "how are you?"),
    ]


def test_an_edit_changes_its_turn_and_a_redaction_removes_one():
    events = [
        said("$1", "whats 2+2"),
        edit("$2", "$1", "what is 2+2?"),
        said("$3", "oops"),
        {
            "type": "m.room.redaction",
            "event_id": "$4",
            "sender": ALICE,
            "redacts": "$3",
            "content": {},
        },
        said("$5", "gone too"),
        {
            "type": "m.room.redaction",
            "event_id": "$6",
            "sender": ALICE,
            "content": {"redacts": "$5"},
        },
        {
            "type": "m.room.message",
            "event_id": "$7",
            "sender": ALICE,
            "content": {},
            "unsigned": {"redacted_because": {}},
        },
        edit("$8", "$1", "forged", sender=BOB),
    ]
    turns = conversation_turns(events, ALICE, BOT)
    assert [(t.event_id, t.text) for t in turns] == [("$1", "what is 2+2?")]


def test_history_is_the_last_turns_before_the_question():
    turns = [Turn("user", f"q{i}", f"${i}", i) for i in range(6)]
    assert [t.text for t in history_before(turns, "$4", 4, 2)] == ["q2", "q3"]
    assert [t.text for t in history_before(turns, "$unknown", 2, 10)] == ["q0", "q1", "q2"]
    assert history_before(turns, "$4", 4, 0) == []


def test_an_edit_is_never_a_new_question_and_a_provisional_notice_answers_nothing():
    assert to_update(edit("$2", "$1", "new text"), BOT) is None
    for notice in (
        answer("$2", "I'll retry", "$1", provisional=True),
        answer(
            "$2",
            "The homeserver is not answering me just now. I'll retry and answer you then.",
            "$1",
        ),
    ):  # sent before the key existed
        events = [said("$1", "hello", ts=10**13), notice]
        assert [ev["event_id"] for ev in catch_up(events, BOT, 0).answer] == ["$1"]


def test_markdown_is_rendered_and_raw_html_stays_text():
    assert render("just text & more") is None  # plain: no formatted_body at all
    html = render(
        '**bold** <script>alert(1)</script> <b onclick="x()">hi</b>\n\n'
        "[click](javascript:alert(1)) [ok](https://example.org)\n\n"
        "```python\nprint(1)\n```"
    )
    assert html is not None
    assert "<strong>bold</strong>" in html
    assert "&lt;script&gt;" in html and "<script" not in html
    assert "onclick" not in html.replace("&lt;b onclick", "")  # only as escaped text
    assert 'href="javascript' not in html and '<a href="https://example.org">ok</a>' in html
    assert '<code class="language-python">' in html
    assert "rel=" not in html


def test_only_agents_that_take_history_get_it():
    class WithHistory:
        async def reply(self, chat, text, *, history):
            return text

    class WithKeywords:
        async def reply(self, chat, text, **options):
            return text

    assert wants_history(WithHistory()) and wants_history(WithKeywords())
    assert not wants_history(EchoAgent())


class ReadingHomeserver:
    bot_id = BOT

    def __init__(self, page: list[dict]) -> None:
        self.page = page
        self.reads = 0

    async def messages(self, room_id, start, end, limit, types):
        self.reads += 1
        return list(reversed(self.page)), None


@pytest.mark.asyncio
async def test_a_room_is_read_once_then_kept_in_step_from_sync_and_answers():
    hs = ReadingHomeserver([said("$1", "first"), answer("$2", "Echo: first", "$1", notice=False)])
    conversation = Conversations(hs, 20)  # type: ignore[arg-type]
    conversation.observe("!r", [said("$3", "second")])  # before the read: the read has it
    hs.page.append(said("$3", "second"))
    assert texts(await conversation.history("!r", ALICE, "$3", 0)) == [
        ("user", "first"),
        ("assistant", "Echo: first"),
    ]
    conversation.sent(
        "!r", "$4", message_content("Echo: second", source_event_id="$3", notice=False)
    )
    conversation.observe("!r", [said("$5", "third"), edit("$6", "$5", "third, edited")])
    assert conversation.follows("!r", "$6")
    assert not conversation.follows("!r", "$5")
    history = await conversation.history("!r", ALICE, "$7", 10**13)
    assert texts(history)[-3:] == [
        ("user", "second"),
        ("assistant", "Echo: second"),
        ("user", "third, edited"),
    ]
    assert hs.reads == 1


class AnsweringHomeserver:
    """The bot's messages after a question: a burst's 60 other answers, then its own."""

    bot_id = BOT

    async def messages_after(self, room_id, event_id, limit, senders):
        return [answer(f"$a{i}", "Echo", f"$q{i}") for i in range(limit)], "t1"

    async def messages(self, room_id, start, end, limit, types, forward=False, senders=None):
        assert forward and start == "t1"
        return [answer(f"$b{i}", "Echo", f"$r{i}") for i in range(10)] + [
            answer("$mine", "Echo: mine", "$q-late", notice=False)
        ], None


@pytest.mark.asyncio
async def test_an_answer_far_after_its_question_is_still_found():
    conversation = Conversations(AnsweringHomeserver(), 20)  # type: ignore[arg-type]
    assert await conversation.answered("!r", "$q-late")
    assert not await conversation.answered("!r", "$never")


def test_a_reply_from_an_older_client_is_read_without_its_quote():
    reply_to: dict[str, Any] = {"m.relates_to": {"m.in_reply_to": {"event_id": "$1"}}}
    quoted = said("$2", "> <@lambda:x> Echo: one\n> more\n\nand two?", **reply_to)
    update = to_update(quoted, BOT)
    assert update is not None and update.body == "and two?"
    assert texts(conversation_turns([quoted], ALICE, BOT)) == [("user", "and two?")]
    update = to_update(said("$3", "> not a reply"), BOT)
    assert update is not None and update.body == "> not a reply"


class RoomsHomeserver:
    """``/messages`` of several rooms, each its own page of events (oldest first)."""

    bot_id = BOT

    def __init__(self) -> None:
        self.pages: dict[str, list[dict]] = {}
        self.reads: list[str] = []

    def talk(self, room_id: str, turns: int, size: int = 200) -> None:
        page = self.pages.setdefault(room_id, [])
        for i in range(len(page), len(page) + turns):
            page.append(said(f"$q{i}{room_id}", f"question {i} " + "x" * size, ts=i))
            page.append(answer(f"$a{i}{room_id}", "A" * size, f"$q{i}{room_id}", notice=False))

    async def messages(self, room_id, start, end, limit, types):
        self.reads.append(room_id)
        return list(reversed(self.pages.get(room_id, [])))[:limit], None

    async def latest(self, room_id, limit, types):
        newest = [ev for ev in reversed(self.pages.get(room_id, [])) if ev["type"] in types]
        return newest[:limit], "position", len(newest) > limit


async def ask(conversation: Conversations, room_id: str) -> list[Turn]:
    return await conversation.history(room_id, ALICE, "$next", 10**13)


def test_slim_events_give_the_same_turns_as_raw_ones():
    reply_to: dict[str, Any] = {"m.relates_to": {"m.in_reply_to": {"event_id": "$2"}}}
    quoted = said("$9", "> <@lambda:x> Hi!\n\nand you?", **reply_to)
    events = [
        said("$1", "hello"),
        answer("$2", "Hi!", "$1", notice=False, html="<b>Hi!</b>"),
        said("$3", "!chats"),
        answer("$4", "Your chats: ...", "$3"),
        said("$5", "I am Bob", BOB),
        answer("$6", "I'll retry", "$7", provisional=True, notice=False),
        said("$7", "whats 2+2"),
        edit("$8", "$7", "what is 2+2?"),
        edit("$8b", "$7", "forged", sender=BOB),
        quoted,
        said("$10", "oops"),
        {"type": "m.room.redaction", "event_id": "$11", "sender": ALICE, "redacts": "$10"},
        {"type": "m.room.message", "event_id": "$12", "sender": ALICE, "content": {}},
    ]
    slimmed = [slim(ev, BOT) for ev in events]
    assert conversation_turns(slimmed, ALICE, BOT) == conversation_turns(events, ALICE, BOT)
    assert [t.text for t in conversation_turns(slimmed, ALICE, BOT)] == [
        "hello",
        "Hi!",
        "what is 2+2?",
        "and you?",
    ]
    assert "formatted_body" not in slimmed[1]["content"] and "content" not in slimmed[3]


@pytest.mark.asyncio
async def test_the_cache_evicts_whole_rooms_least_recently_used_first():
    hs = RoomsHomeserver()
    for room_id in ("!a", "!b", "!c", "!d"):
        hs.talk(room_id, 10)
    probe = Conversations(hs, 20)  # type: ignore[arg-type]
    await ask(probe, "!a")
    conversation = Conversations(hs, 20, budget=int(probe.size * 3.5))  # type: ignore[arg-type]
    hs.reads.clear()
    for room_id in ("!a", "!b", "!c"):
        await ask(conversation, room_id)
    conversation.observe("!a", [said("$new", "still here")])  # !a is used again: !b is oldest
    await ask(conversation, "!d")
    assert ["!a" in conversation, "!b" in conversation, "!c" in conversation] == [
        True,
        False,
        True,
    ]
    assert conversation.follows("!a", "$new")
    await ask(conversation, "!c")
    assert hs.reads == ["!a", "!b", "!c", "!d"]  # !c was kept: no second read


@pytest.mark.asyncio
async def test_a_room_read_again_after_eviction_gives_the_same_turns():
    hs = RoomsHomeserver()
    hs.talk("!a", 30)
    hs.talk("!b", 30)
    probe = Conversations(hs, 20)  # type: ignore[arg-type]
    await ask(probe, "!a")
    conversation = Conversations(hs, 20, budget=int(probe.size * 1.5))  # type: ignore[arg-type]
    hs.reads.clear()
    await ask(conversation, "!a")
    later = [said("$late", "one more"), edit("$late-edit", "$q29!a", "edited")]
    hs.pages["!a"] += later
    conversation.observe("!a", later)  # kept in step from sync
    kept = await ask(conversation, "!a")
    await ask(conversation, "!b")  # !a is evicted, its latest message with it
    assert "!a" not in conversation and not conversation.follows("!a", "$late-edit")
    again = await ask(conversation, "!a")
    assert again == kept and hs.reads == ["!a", "!b", "!a"]
    assert kept[-1].text == "one more" and kept[-3].text == "edited"


@pytest.mark.asyncio
async def test_the_budget_holds_whatever_the_number_of_rooms():
    hs = RoomsHomeserver()
    budget = 400_000  # a few rooms (one alone may go over it: the room at hand is kept)
    conversation = Conversations(hs, 20, budget=budget)  # type: ignore[arg-type]
    for i in range(300):
        room_id = f"!r{i}"
        hs.talk(room_id, 1 + i % 40, size=100 + 20 * (i % 50))
        conversation.observe(f"!seen{i}", [said(f"$s{i}", "a room never read")])
        await ask(conversation, room_id)
        conversation.sent(room_id, f"$b{i}", message_content("B" * 3000, source_event_id="$x"))
        assert conversation.size <= budget
    fresh = Conversations(hs, 20)  # type: ignore[arg-type]  # what is kept, counted afresh
    for room_id in [r for r in conversation._rooms if r.startswith("!r")]:
        await ask(fresh, room_id)
        fresh.sent(room_id, f"$b{room_id[2:]}", message_content("B" * 3000, source_event_id="$x"))
    for room_id in [r for r in conversation._rooms if r.startswith("!seen")]:
        fresh.observe(room_id, [said(f"$s{room_id[5:]}", "a room never read")])
    assert fresh.size == conversation.size
    assert 0 < len(conversation._rooms) < 300


@pytest.mark.asyncio
async def test_a_room_being_read_is_never_evicted_and_keeps_what_sync_adds_meanwhile():
    hs = RoomsHomeserver()
    for room_id in ("!a", "!b", "!c"):
        hs.talk(room_id, 10)
    probe = Conversations(hs, 20)  # type: ignore[arg-type]
    await ask(probe, "!a")
    conversation = Conversations(hs, 20, budget=int(probe.size * 1.5))  # type: ignore[arg-type]
    release, read = asyncio.Event(), hs.messages

    async def slow_a(room_id, *args):
        if room_id == "!a":
            await release.wait()
        return await read(room_id, *args)

    hs.messages = slow_a  # type: ignore[method-assign]
    reading = asyncio.create_task(ask(conversation, "!a"))
    await asyncio.sleep(0)
    conversation.observe("!a", [said("$during", "sent during the read")])
    await ask(conversation, "!b")
    await ask(conversation, "!c")  # over the budget: !b goes, not !a
    assert "!a" in conversation and "!b" not in conversation
    release.set()
    await reading
    assert (await ask(conversation, "!a"))[-1].text == "sent during the read"


@pytest.mark.asyncio
async def test_without_a_sync_feed_each_answer_reads_the_room_and_the_lanes_say_the_latest():
    """Replicas: what other replicas saw (an edit) is in the next history, and the latest
    message is the last one handed to this replica's lane, or its own answer."""
    hs = RoomsHomeserver()
    hs.talk("!a", 2)
    conversation = Conversations(hs, 20, fed=False)  # type: ignore[arg-type]
    await ask(conversation, "!a")
    edited = edit("$e", "$q0!a", "question 0, edited")
    hs.pages["!a"] += [edited, said("$late", "one more")]
    conversation.observe("!a", [said("$unseen", "not in the room")])  # a feed is ignored
    turns = await ask(conversation, "!a")
    assert hs.reads == ["!a", "!a"]
    assert turns[0].text == "question 0, edited" and turns[-1].text == "one more"
    assert not conversation.follows("!a", "$late")  # not handed to a lane here
    conversation.arrived("!a", "$late")
    assert conversation.follows("!a", "$late")
    conversation.sent("!a", "$answer", message_content("Echo", source_event_id="$late"))
    assert not conversation.follows("!a", "$late")
