"""ChatManager and title validation."""

from __future__ import annotations

import pytest

from core.chat import Chat, ChatManager, ChatNotFound, InvalidTitle, new_chat_id, validate_title


@pytest.fixture
def chats(store):
    return ChatManager(store)


async def test_get_or_create_then_rename_archive_and_list(chats):
    chat = await chats.get_or_create("@a:x", "c1", "First")
    assert await chats.get_or_create("@a:x", "c1", "Ignored") == chat
    await chats.get_or_create("@a:x", "c2", "Second")
    await chats.get_or_create("@b:x", "c3", "Other user")
    assert (await chats.rename("@a:x", "c1", "  Renamed ")).title == "Renamed"
    assert (await chats.archive("@a:x", "c2")).status == "archived"
    assert [c.chat_id for c in await chats.list_active("@a:x")] == ["c1"]
    assert len(await chats.list_all("@a:x")) == 2


async def test_missing_chat_raises_chat_not_found(chats):
    with pytest.raises(ChatNotFound):
        await chats.rename("@a:x", "nope", "t")


async def test_restore_is_idempotent_and_exact(chats):
    chat = Chat("c9", "@a:x", "Healed", "archived", 12.5)
    for _ in range(2):
        async with chats._store.transaction() as tx:
            chats.restore(chat, tx)
    assert await chats.get("@a:x", "c9") == chat


def test_chat_ids_are_random_hex():
    ids = {new_chat_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 12 for i in ids)


@pytest.mark.parametrize(
    "title,reason", [("", "empty"), ("   ", "empty"), ("x" * 256, "too long"), ("a\nb", "control")]
)
def test_bad_titles_are_rejected_with_reason(title, reason):
    with pytest.raises(InvalidTitle, match=reason):
        validate_title(title)


def test_title_of_255_characters_is_fine():
    assert validate_title("é" * 255) == "é" * 255


@pytest.mark.parametrize(
    "title", ["\u200b", " \u200b\u200d ", "a\u202eb", "a\u2028b", "a\ud800b", "x\u2066y"]
)
def test_invisible_titles_and_direction_overrides_are_refused(title):
    with pytest.raises(InvalidTitle):
        validate_title(title)


def test_emoji_sequences_with_joiners_are_fine():
    assert validate_title("Family 👨\u200d👩\u200d👧") == "Family 👨\u200d👩\u200d👧"
