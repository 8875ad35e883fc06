"""Hostile strings sent through the live bot (SPEC §8): each gets one clear answer or
refusal, never a traceback; titles are HTML-escaped in ``formatted_body``; the bot keeps
answering. (The parser and the title check are fuzzed in tests/unit/test_hostile_input.py.)"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from nio import RoomSendResponse

from adapter.matrix.vocabulary.content import SOURCE_KEY

HTML_TITLE = "<img src=x onerror=alert(1)><b>bold</b> & co"
SCRIPT_TITLE = "<script>alert(1)</script>"
MARKDOWN_TITLE = "[click](https://evil.example) **bold** `code`"

# (what it is, the body sent, a piece of the one answer expected)
SAMPLES = [
    ("rename over 255 characters", "!rename " + "x" * 300, "too long (300 characters"),
    ("rename of 10,000 characters", "!rename " + "y" * 10_000, "too long (10000 characters"),
    ("rename with a bell", "!rename bell\x07here", "control characters"),
    ("rename with a newline", "!rename two\nlines", "control characters"),
    ("rename with NUL", "!rename nul\x00here", "control characters"),
    ("rename with an ANSI escape", "!rename \x1b[31mred", "control characters"),
    ("rename with only whitespace", "!rename   \t  ", "cannot be empty"),
    ("rename with only Unicode spaces", "!rename \u3000\u00a0\u2003", "cannot be empty"),
    ("rename with RTL override", "!rename \u202eevil title", "text-direction overrides"),
    ("rename with only zero-width characters", "!rename \u200b\u200d", "no visible characters"),
    ("rename with emoji", "!rename 🎉 party 👨\u200d👩\u200d👧", "Renamed to"),
    ("rename with mixed-case name", "!ReNaMe Case", "Renamed to “Case”"),
    ("rename with HTML", f"!rename {HTML_TITLE}", "Renamed to"),
    ("chats listing an HTML title", "!chats", "Your chats"),
    ("rename with markdown", f"!rename {MARKDOWN_TITLE}", "Renamed to"),
    ("new with a script title", f"!new {SCRIPT_TITLE}", "Created"),
    ("chats listing a script title", "!chats", "Your chats"),
    ("unknown command made of HTML", "!<b>hi</b>", "Unknown command"),
    ("a lone bang", "!", "Unknown command"),
    ("upper-case help", "!HELP", "Commands:"),
    ("confirm with nothing pending", "!CONFIRM now", "nothing to confirm"),
    ("body of 10,000 characters", "z" * 10_000, "Echo: zzzz"),
    ("body with control characters and NUL", "ding\x07\x1b[31mred\x00nul", "Echo: ding"),
    ("body with RTL override and zero-width", "\u202eabc\u200bdef", "Echo: \u202eabc"),
    ("body of HTML", SCRIPT_TITLE, f"Echo: {SCRIPT_TITLE}"),
    ("body of emoji only", "👨\u200d👩\u200d👧🎉", "Echo: 👨"),
]
CRASH_TEXT = ["Traceback", "Exception", "something went wrong", 'File "']
BOT_MARKUP = {"p", "ul", "li", "b", "a"}  # what the bot's own HTML is made of


class Markup(HTMLParser):
    """The elements of an HTML body: (tag, attributes), in order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


def injected(html: str) -> list[tuple[str, dict]]:
    """Elements or attributes the bot did not write itself: only its own tags, and links
    only to matrix.to, may appear."""
    return [
        (tag, attrs)
        for tag, attrs in Markup(html).elements
        if tag not in BOT_MARKUP
        or set(attrs) - {"href"}
        or (tag == "a" and not (attrs.get("href") or "").startswith("https://matrix.to/"))
    ]


def answers_to(user, room_id: str, bot_id: str, event_id: str) -> list[dict]:
    return [
        ev for ev in user.bot_messages(room_id, bot_id) if ev["content"].get(SOURCE_KEY) == event_id
    ]


async def test_hostile_strings_each_get_one_clear_answer_and_html_is_escaped(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    problems = []
    for what, body, expected in SAMPLES:
        event_id = await alice.send(chat, body)
        await alice.wait_for(lambda e=event_id: answers_to(alice, chat, bot.user_id, e))
        answers = answers_to(alice, chat, bot.user_id, event_id)
        text = " | ".join(ev["content"]["body"] for ev in answers)
        if len(answers) != 1 or expected not in text:
            problems.append(f"{what}: {len(answers)} answers, {text[:200]!r}")
        if any(marker in text for marker in CRASH_TEXT):
            problems.append(f"{what}: crash text in {text[:200]!r}")
        if bad := injected(answers[0]["content"].get("formatted_body", "")):
            problems.append(f"{what}: injected markup in formatted_body: {bad}")
    assert not problems, "\n".join(problems)
    listing = [
        ev["content"]
        for ev in alice.bot_messages(chat, bot.user_id)
        if ev["content"]["body"].startswith("Your chats")
    ]
    assert (
        "&lt;img src=x onerror=alert(1)&gt;&lt;b&gt;bold&lt;/b&gt; &amp; co"
        in listing[0]["formatted_body"]
    )
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in listing[1]["formatted_body"]
    assert not bot.logs.named("event.handler_crashed")
    await alice.ask(chat, bot.user_id, "still there?", "Echo: still there?")


@pytest.mark.warnings_expected("the homeserver refuses an answer over its event size limit")
async def test_a_body_whose_echo_is_over_the_event_size_limit_gets_a_refusal_not_a_crash(
    bot, make_user
):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    for size in range(65_536, 63_000, -16):  # the longest body the homeserver takes from her
        sent = await alice.client.room_send(
            chat, "m.room.message", {"msgtype": "m.text", "body": "w" * size}
        )
        if isinstance(sent, RoomSendResponse):
            break
    event_id = sent.event_id  # its echo is longer than that, by "Echo: " and the source key
    await alice.wait_for(lambda: answers_to(alice, chat, bot.user_id, event_id))
    [answer] = answers_to(alice, chat, bot.user_id, event_id)
    assert "too large for the homeserver" in answer["content"]["body"]
    assert not bot.logs.named("event.handler_crashed")
    await alice.ask(chat, bot.user_id, "still there?", "Echo: still there?")
