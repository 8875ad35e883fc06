"""The marker format on the wire (SPEC §5), parsed and written in one place."""

from __future__ import annotations

import pytest

from adapter.matrix.vocabulary.markers import ChatMarker, MalformedMarker, SpaceMarker

ALICE = "@alice:localhost"


def test_space_marker_wire_format():
    assert SpaceMarker(ALICE).state_event() == {
        "type": "io.lambda.space",
        "state_key": "",
        "content": {"owner": ALICE, "v": 1},
    }


def test_chat_marker_wire_format():
    assert ChatMarker(ALICE, "abc123def456", "archived").state_event() == {
        "type": "io.lambda.chat",
        "state_key": "",
        "content": {"owner": ALICE, "chat_id": "abc123def456", "status": "archived", "v": 1},
    }


@pytest.mark.parametrize(
    "marker",
    [SpaceMarker(ALICE), ChatMarker(ALICE, "c1", "active"), ChatMarker(ALICE, "c1", "archived")],
)
def test_a_written_marker_parses_back_to_itself(marker):
    assert type(marker).parse(marker.content()) == marker


def test_parse_ignores_the_version_and_unknown_fields():
    content = {"owner": ALICE, "chat_id": "c1", "status": "active", "v": 7, "extra": True}
    assert ChatMarker.parse(content) == ChatMarker(ALICE, "c1", "active")
    assert SpaceMarker.parse({"owner": ALICE}) == SpaceMarker(ALICE)


@pytest.mark.parametrize("marker", [SpaceMarker, ChatMarker])
def test_empty_content_is_no_marker(marker):
    """A redacted marker keeps an empty content: it counts as none."""
    assert marker.parse({}) is None


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"owner": "alice", "chat_id": "x", "status": "active"}, "owner"),
        ({"chat_id": "x", "status": "active"}, "owner"),
        ({"owner": ALICE, "chat_id": "", "status": "active"}, "chat_id"),
        ({"owner": ALICE, "chat_id": 12, "status": "active"}, "chat_id"),
        ({"owner": ALICE, "chat_id": "x", "status": "deleted"}, "status"),
        ({"owner": ALICE, "chat_id": "x"}, "status"),
    ],
)
def test_malformed_chat_marker_names_the_field(content, field):
    with pytest.raises(MalformedMarker, match=f"io.lambda.chat: {field} is"):
        ChatMarker.parse(content)


@pytest.mark.parametrize("owner", [None, "", "alice", 42])
def test_malformed_space_marker_names_the_owner(owner):
    with pytest.raises(MalformedMarker, match="io.lambda.space: owner is"):
        SpaceMarker.parse({"owner": owner, "v": 1})
