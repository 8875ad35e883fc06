"""Who may use the bot, the chat cap and the creation throttle (SPEC §5), as pure rules."""

from __future__ import annotations

from adapter.matrix.chain.access import Access


def test_glob_patterns_over_user_ids_are_case_sensitive_and_anchored():
    access = Access(("@*:example.org", "@ann:other.org"), max_chats=10)
    assert access.allows("@bob:example.org") and access.allows("@ann:other.org")
    assert not access.allows("@bob:other.org")
    assert not access.allows("@bob:example.org.evil.net")  # the whole id must match
    assert not access.allows("@bob:EXAMPLE.ORG")


def test_the_chat_cap_is_refused_with_a_clear_message():
    access = Access(("@*:x",), max_chats=2)
    assert access.creation_refused("@a:x", active_chats=1) is None
    refusal = access.creation_refused("@a:x", active_chats=2)
    assert refusal and "2 active chats" in refusal and "!archive" in refusal


def test_creation_is_throttled_per_user_within_a_sliding_window():
    access = Access(("@*:x",), max_chats=100, creations_per_window=2, window_s=60)
    for t in (0.0, 10.0):
        assert access.creation_refused("@a:x", 0, now=t) is None
        access.record_creation("@a:x", now=t)
    refusal = access.creation_refused("@a:x", 0, now=20.0)
    assert refusal and "try again in 40 s" in refusal
    assert access.creation_refused("@b:x", 0, now=20.0) is None  # others are not slowed
    assert access.creation_refused("@a:x", 0, now=60.5) is None  # the first one expired
