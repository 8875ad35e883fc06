"""Hostile command strings, generated (hypothesis): the command parser and the title check
never fail on any text, and what they accept is within the documented limits (SPEC §5)."""

from __future__ import annotations

import unicodedata

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adapter.matrix.chain.command_table import COMMANDS, UNKNOWN, parse_command
from adapter.matrix.ingest.update import Update
from core.chat import MAX_TITLE_LENGTH, InvalidTitle, validate_title

# No example database: nothing is written into the work tree, and every run is fresh.
settings.register_profile(
    "hostile",
    database=None,
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("hostile")

# Everything a Matrix body can carry, weighted towards what breaks text handling.
NASTY = st.sampled_from(
    [
        "\x00",
        "\n",
        "\r",
        "\t",
        "\x1b[31m",
        "\x7f",
        "\x85",
        "\u200b",
        "\u200e",
        "\u202e",
        "\u2028",
        "\u2029",
        "\ufeff",
        "\ufffd",
        "\ud800",
        "İ",
        "ß",
        "ǅ",
        "🎉",
        "👨\u200d👩\u200d👧",
        "<script>alert(1)</script>",
        "<b>",
        "&amp;",
        "[x](https://evil.example)",
        "**",
        "`",
        "!",
        "!!",
        " ",
        "\u3000",
        "\u00a0",
        "%",
        "%00",
        "\\",
        '"',
        "'",
    ]
)
TEXT = st.lists(st.one_of(st.text(), NASTY), max_size=12).map("".join)
LONG = st.integers(0, 20_000).map(lambda n: "x" * n)
NAME_CASINGS = st.sampled_from(sorted(COMMANDS)).flatmap(
    lambda name: st.tuples(
        st.just(name), st.lists(st.booleans(), min_size=len(name), max_size=len(name))
    )
)


def is_control(text: str) -> bool:
    """Controls, surrogates, line/paragraph separators, bidi overrides (as core.chat says)."""
    return any(
        unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")
        or 0x202A <= ord(ch) <= 0x202E
        or 0x2066 <= ord(ch) <= 0x2069
        for ch in text
    )


def invisible(text: str) -> bool:
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


@given(st.one_of(TEXT, LONG), st.one_of(TEXT, LONG))
@example("", "")
@example(" \t ", "\x00")
def test_parsing_any_command_string_never_fails(head: str, tail: str):
    body = f"!{head} {tail}"
    assert Update("message", "!r:x", "@a:x", "$e", body=body).is_command
    cmd = parse_command(body)
    assert cmd.spec is COMMANDS.get(cmd.name, UNKNOWN)
    assert not any(ch.isspace() for ch in cmd.name) and cmd.name == cmd.name.lower()
    assert cmd.args == cmd.args.strip()
    assert cmd.args in body


@given(NAME_CASINGS, st.sampled_from([" ", "  ", " \u3000"]), TEXT)
def test_command_names_are_case_insensitive(casing, gap: str, args: str):
    name, upper = casing
    typed = "".join(ch.upper() if up else ch for ch, up in zip(name, upper, strict=True))
    cmd = parse_command(f"!{typed}{gap}{args}")
    assert cmd.name == name and cmd.spec is COMMANDS[name]
    assert cmd.args == f"{gap}{args}".strip()


@given(st.one_of(TEXT, LONG))
@example("")
@example("   ")
@example("\u3000\u00a0\n")
@example("x" * (MAX_TITLE_LENGTH + 1))
@example(" " + "x" * MAX_TITLE_LENGTH + " ")
@example("a\x00b")
def test_a_title_is_accepted_only_within_the_limits_and_refused_only_with_invalid_title(raw: str):
    stripped = raw.strip()
    try:
        title = validate_title(raw)
    except InvalidTitle as err:
        message = str(err)
        assert message.endswith(".") and 0 < len(message) < 200  # one clear sentence
        assert invisible(stripped) or len(stripped) > MAX_TITLE_LENGTH or is_control(stripped)
        return
    assert title == stripped
    assert 1 <= len(title) <= MAX_TITLE_LENGTH
    assert not is_control(title) and not invisible(title)
    assert validate_title(title) == title  # idempotent: a stored title stays valid


@given(TEXT)
def test_rename_arguments_from_the_parser_are_valid_titles_or_refused(text: str):
    args = parse_command(f"!rename {text}").args
    try:
        title = validate_title(args)
    except InvalidTitle:
        return
    assert title == args  # the parser already stripped what the title check strips
