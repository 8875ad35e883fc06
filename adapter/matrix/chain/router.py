"""Room id -> typed route, from the local cache. Unknown rooms get the ``Unregistered`` fallback."""

from __future__ import annotations

from dataclasses import dataclass

from adapter.matrix.store.records import MatrixStore, RoomMeta


@dataclass(frozen=True)
class ChatRoute:
    room_id: str
    meta: RoomMeta

    @property
    def owner(self) -> str:
        return self.meta.owner


@dataclass(frozen=True)
class LobbyRoute:
    room_id: str
    owner: str


@dataclass(frozen=True)
class SpaceRoute:
    room_id: str
    owner: str


@dataclass(frozen=True)
class Unregistered:
    room_id: str

    def __str__(self) -> str:
        return f"unregistered:{self.room_id}"


Route = ChatRoute | LobbyRoute | SpaceRoute | Unregistered


class RoomRouter:
    def __init__(self, store: MatrixStore) -> None:
        self._store = store
        # The route each room resolved to last in this run: whom to tell while the DB
        # cannot be read (PostgreSQL down), and nothing else.
        self._last: dict[str, Route] = {}

    async def resolve(self, room_id: str) -> Route:
        route = self._route(room_id, await self._store.get_room(room_id))
        self._last[room_id] = route
        return route

    def last_known(self, room_id: str) -> Route | None:
        """The room's route as last resolved in this run (None: never), for a notice only."""
        return self._last.get(room_id)

    @staticmethod
    def _route(room_id: str, meta: RoomMeta | None) -> Route:
        if meta is None:
            return Unregistered(room_id)
        if meta.kind == "chat" and meta.chat_id:
            return ChatRoute(room_id, meta)
        if meta.kind == "lobby":
            return LobbyRoute(room_id, meta.owner)
        if meta.kind == "space":
            return SpaceRoute(room_id, meta.owner)
        return Unregistered(room_id)
