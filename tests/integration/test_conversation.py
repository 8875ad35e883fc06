"""The conversation lives on the homeserver (SPEC §5): the history an agent is given, read
from the room, the same after a total loss or a reset; exactly once from the room itself;
Markdown answers, and rich replies where an answer does not follow its question."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from adapter.matrix.vocabulary.content import SOURCE_KEY
from tests.integration.agents import RecordingAgent
from tests.integration.conftest import TIMEOUT, BotProcess, BotRunner, reset_tool


class GatedMarkdownAgent:
    """Old style (no history): answers in Markdown with hostile bits; holds "slow" texts."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding: list[str] = []

    async def reply(self, chat, text: str) -> str:
        if text.startswith("slow"):
            self.holding.append(text)
            await self.release.wait()
        return (
            f'**Echo:** {text}\n\n<script>alert(1)</script> <b onmouseover="x()">raw</b>'
            "\n\n[click](javascript:alert(1))\n\n```python\nprint('hi')\n```"
        )


def answer_to(user, room_id: str, bot_id: str, event_id: str) -> list[dict]:
    return [
        ev["content"]
        for ev in user.bot_messages(room_id, bot_id)
        if ev["content"].get(SOURCE_KEY) == event_id
    ]


async def ask(user, room_id: str, bot_id: str, text: str) -> str:
    """Send ``text``, wait for its echo; returns the question's event id."""
    event_id = await user.send(room_id, text)
    await user.wait_for(lambda: answer_to(user, room_id, bot_id, event_id))
    return event_id


async def test_the_agent_gets_the_rooms_conversation_across_a_total_loss_and_a_reset(
    bot_config, logs, make_user
):
    agent = RecordingAgent()
    bot = BotRunner(bot_config, logs, agent)
    await bot.start()
    alice = await make_user("alice")
    lobby, _, chat = await alice.onboard(bot.user_id)
    bot_id = bot.user_id

    one = await ask(alice, chat, bot_id, "one")
    assert agent.history_of("one") == []
    await alice.ask(chat, bot_id, "!chats", "Your chats")  # a command and its answer
    await ask(alice, chat, bot_id, "two")
    assert agent.history_of("two") == [("user", "one"), ("assistant", "Echo: one")]

    await alice.ask(lobby, bot_id, "!new Elsewhere", "Elsewhere")  # another room
    await alice.wait_for(lambda: alice.invites)
    other = next(iter(alice.invites))
    await alice.join(other)
    await ask(alice, other, bot_id, "in another room")
    assert agent.history_of("in another room") == []

    edit = await alice.send_content(
        chat,
        {
            "msgtype": "m.text",
            "body": "* one, edited",
            "m.new_content": {"msgtype": "m.text", "body": "one, edited"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": one},
        },
    )
    two = next(ev["event_id"] for ev in alice.timeline[chat] if ev["content"].get("body") == "two")
    await alice.client.room_redact(chat, two)
    await ask(alice, chat, bot_id, "three")
    expected = [("user", "one, edited"), ("assistant", "Echo: one"), ("assistant", "Echo: two")]
    assert agent.history_of("three") == expected
    assert answer_to(alice, chat, bot_id, edit) == []  # an edit is not a new question

    await bot.restart_losing("everything")
    await ask(alice, chat, bot_id, "four")
    expected += [("user", "three"), ("assistant", "Echo: three")]
    assert agent.history_of("four") == expected

    await bot.stop()
    code, out = await reset_tool(bot.config, "--yes")
    assert code == 0, out
    await bot.start()
    await ask(alice, chat, bot_id, "five")
    expected += [("user", "four"), ("assistant", "Echo: four")]
    assert agent.history_of("five") == expected
    assert len(logs.named("conversation.read", room_id=chat)) == 3  # once a run

    await bot.stop()
    bounded = BotRunner(replace(bot_config, history_turns=2), logs, agent)
    await bounded.start()
    await ask(alice, chat, bot_id, "six")
    assert agent.history_of("six") == [("user", "five"), ("assistant", "Echo: five")]
    await bounded.stop()


async def test_answers_render_markdown_safely_and_reply_where_they_do_not_follow(
    bot_config, logs, make_user
):
    agent = GatedMarkdownAgent()
    bot = BotRunner(bot_config, logs, agent)
    await bot.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    bot_id = bot.user_id

    solo = await ask(alice, chat, bot_id, "solo")
    [content] = answer_to(alice, chat, bot_id, solo)
    assert content["body"].startswith("**Echo:** solo")  # body keeps the Markdown
    html = content["formatted_body"]
    assert content["format"] == "org.matrix.custom.html"
    assert "<strong>Echo:</strong> solo" in html
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "<b " not in html and "javascript:" not in html.replace("](javascript:", "")
    assert '<code class="language-python">' in html
    assert "m.relates_to" not in content  # it directly follows its question: plain

    slow = await alice.send(chat, "slow question")
    await alice.wait_for(lambda: agent.holding)
    ingested = len(logs.named("sync.ingested"))
    quick = await alice.send(chat, "quick one")
    await logs.wait_for("sync.ingested", count=ingested + 1)  # the bot has seen it come in
    agent.release.set()
    for question in (slow, quick):  # after a burst: each answer names its question
        await alice.wait_for(lambda q=question: answer_to(alice, chat, bot_id, q))
        [content] = answer_to(alice, chat, bot_id, question)
        assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": question}}

    await bot.stop()
    missed = [await alice.send(chat, f"while down {i}") for i in range(2)]
    await bot.lose("everything")
    await bot.start()
    for question in missed:  # caught up after a total loss: rich replies too
        await alice.wait_for(lambda q=question: answer_to(alice, chat, bot_id, q))
        [content] = answer_to(alice, chat, bot_id, question)
        assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": question}}
    await bot.stop()


@pytest.mark.parametrize("device", ["same_device", "new_device"])
async def test_an_answer_whose_response_was_lost_is_not_sent_or_thought_again(
    bot_config, logs, make_user, proxy, tmp_path: Path, monkeypatch, device
):
    calls = tmp_path / "agent_calls.txt"
    monkeypatch.setenv("TEST_AGENT_CALLS", str(calls))
    config = replace(
        bot_config,
        homeserver=proxy.url,  # the session is kept per URL
        agent="tests.integration.agents:CountingAgent",
    )
    bot = BotRunner(config, logs)
    await bot.start()
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()

    answered = proxy.hold("PUT", r"/send/m\.room\.message/lambda-reply-", forward=True)
    proc = BotProcess(config)
    await proc.start()
    await proc.wait_log("bot.ready")
    once = await alice.send(chat, "once")
    await asyncio.wait_for(answered.wait(), TIMEOUT)  # Synapse has the answer; the bot not
    await proc.kill()
    proxy.heal()
    if device == "new_device":  # the homeserver's memory of transaction ids is per device
        await bot.lose("matrix_store")

    await bot.start()
    await logs.wait_for("event.already_answered", event_id=once)
    await alice.ask(chat, bot.user_id, "next", "Echo: next")
    assert len(answer_to(alice, chat, bot.user_id, once)) == 1
    assert calls.read_text().splitlines() == ["once", "next"]  # the agent ran once for it
    await bot.stop()
