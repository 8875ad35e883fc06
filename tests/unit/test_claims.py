"""Which replica takes which room (adapter.matrix.delivery.claims.owner): every room has one
owner among the live replicas, rooms are spread, and a replica gone moves only its rooms."""

from __future__ import annotations

from collections import Counter

from adapter.matrix.delivery.claims import owner


def test_each_room_has_one_owner_and_rooms_are_spread():
    rooms = [f"!room{i}:localhost" for i in range(300)]
    live = ["a", "b", "c"]
    owners = {room: owner(room, live) for room in rooms}
    assert owners == {room: owner(room, list(reversed(live))) for room in rooms}  # any order
    assert min(Counter(owners.values()).values()) > 60  # about 100 each


def test_a_replica_gone_moves_only_its_own_rooms():
    rooms = [f"!room{i}:localhost" for i in range(300)]
    before = {room: owner(room, ["a", "b", "c"]) for room in rooms}
    after = {room: owner(room, ["a", "c"]) for room in rooms}
    assert {room for room in rooms if before[room] != after[room]} == {
        room for room in rooms if before[room] == "b"
    }
