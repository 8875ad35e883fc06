"""Power levels of the rooms the bot creates, per room version (SPEC §5), without a server."""

from __future__ import annotations

import pytest
from nio import ErrorResponse

from adapter.matrix.homeserver.client import CapabilitiesResponse, creators_privileged, power_levels
from adapter.matrix.vocabulary.markers import ChatMarker, SpaceMarker

BOT, ALICE = "@lambda:example.org", "@alice:example.org"
PRE_12 = ["1", "9", "10", "11", "org.matrix.msc3757.11", "an.unknown.version", None]
FROM_12: list[str | None] = ["12", "13", "42", "org.matrix.hydra.11"]
BOT_ONLY = [
    SpaceMarker.TYPE,
    ChatMarker.TYPE,
    "m.space.child",
    "m.space.parent",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.encryption",
    "m.room.tombstone",
    "m.room.server_acl",
    "io.lambda.future",
]


def required(levels: dict, event_type: str) -> int:
    return levels["events"].get(event_type, levels["state_default"])


def power_of(levels: dict, user_id: str, version: str | None) -> float:
    if user_id == BOT and creators_privileged(version):
        return float("inf")
    return levels["users"].get(user_id, levels["users_default"])


@pytest.mark.parametrize("version", PRE_12)
def test_before_12_the_bot_is_listed_at_100(version):
    assert not creators_privileged(version)
    assert power_levels(ALICE, BOT, version)["users"] == {BOT: 100, ALICE: 50}


@pytest.mark.parametrize("version", FROM_12)
def test_from_12_the_bot_is_not_listed(version):
    assert creators_privileged(version)
    assert power_levels(ALICE, BOT, version)["users"] == {ALICE: 50}


@pytest.mark.parametrize("version", PRE_12 + FROM_12)
def test_owner_restyles_but_cannot_forge_a_marker_or_raise_herself(version):
    levels = power_levels(ALICE, BOT, version)
    alice = power_of(levels, ALICE, version)
    assert alice == 50
    for event_type in ("m.room.name", "m.room.topic", "m.room.avatar"):
        assert alice >= required(levels, event_type)
    for event_type in BOT_ONLY:
        assert alice < required(levels, event_type) <= power_of(levels, BOT, version)
    assert alice >= levels["events_default"]  # she can chat
    assert alice < min(levels["invite"], levels["kick"], levels["ban"], levels["redact"])


@pytest.mark.parametrize(
    ("body", "default"),
    [
        (
            {"capabilities": {"m.room_versions": {"default": "10", "available": {"10": "stable"}}}},
            "10",
        ),
        ({"capabilities": {"m.room_versions": {"default": 11}}}, "11"),
        ({"capabilities": {"m.change_password": {"enabled": True}}}, None),
    ],
)
def test_capabilities_give_the_default_room_version(body, default):
    resp = CapabilitiesResponse.from_dict(body)
    assert isinstance(resp, CapabilitiesResponse) and resp.default_room_version == default


def test_capabilities_error_is_an_error_response():
    resp = CapabilitiesResponse.from_dict({"errcode": "M_UNKNOWN_TOKEN", "error": "nope"})
    assert isinstance(resp, ErrorResponse) and resp.status_code == "M_UNKNOWN_TOKEN"
