"""Thin typed calls to the homeserver: nio's error responses become ``HomeserverError``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import ClientError
from nio import (
    AsyncClient,
    ErrorResponse,
    JoinedRoomsResponse,
    JoinResponse,
    Response,
    RoomContextResponse,
    RoomCreateResponse,
    RoomGetStateResponse,
    RoomInviteResponse,
    RoomLeaveResponse,
    RoomMessagesResponse,
    RoomPutStateResponse,
    RoomSendResponse,
    RoomTypingResponse,
    SyncResponse,
)
from nio.api import Api, MessageDirection, RoomPreset, RoomVisibility

from adapter.matrix.vocabulary.markers import ChatMarker, MalformedMarker, SpaceMarker
from core.chat import ChatStatus

R = TypeVar("R")
SPACE_NAME = "Lambda"
# nio's own 429 handling is off (see bot.client_config): waits up to this long are absorbed
# here, longer ones surface as HomeserverError with retry_after_ms, never blocking the bot.
SHORT_RATE_LIMIT_MS = 3000
MAX_SHORT_RATE_LIMIT_RETRIES = 2
UNSTABLE_API_PATH = "/_matrix/client/unstable"


class HomeserverError(Exception):
    """A homeserver call failed (error status, rate limit or unreachable)."""

    def __init__(
        self,
        what: str,
        status: str,
        message: str,
        retry_after_ms: int | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(f"{what}: {status} {message}".strip())
        self.status = status
        self.retry_after_ms = retry_after_ms
        self.http_status = http_status

    @property
    def transient(self) -> bool:
        """Unreachable, rate-limited or a server error: the same call may succeed later."""
        return self.status in ("unreachable", "M_LIMIT_EXCEEDED") or (self.http_status or 0) >= 500


# Unstable room versions that already follow version 12's rule for creators (MSC4289).
PRIVILEGED_CREATOR_VERSIONS = frozenset({"org.matrix.hydra.11"})


def creators_privileged(room_version: str | None) -> bool:
    """True when the room version gives its creator unlimited power (version 12 and later).

    An unknown or unreported version is treated like one before 12. A wrong guess fails
    closed either way: createRoom refuses a ``users`` map of the wrong shape with a 400.
    """
    if room_version is None:
        return False
    if room_version in PRIVILEGED_CREATOR_VERSIONS:
        return True
    return room_version.isdigit() and int(room_version) >= 12


def power_levels(owner: str, bot_id: str, room_version: str | None) -> dict[str, Any]:
    """Owner 50; name/topic/avatar 50; every other state event 100, in ``room_version``.

    From version 12 the creator (the bot) has unlimited power and must not be listed in
    ``users``; before 12 it must be listed, at 100. An ``events`` map replaces the whole
    default map, so ``state_default`` is 100 too.
    """
    users = {owner: 50} if creators_privileged(room_version) else {bot_id: 100, owner: 50}
    return {
        "users": users,
        "users_default": 0,
        "events_default": 0,
        "state_default": 100,
        "invite": 100,
        "kick": 100,
        "ban": 100,
        "redact": 100,
        "events": {
            "m.room.name": 50,
            "m.room.topic": 50,
            "m.room.avatar": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 100,
            "m.room.encryption": 100,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.space.child": 100,
            "m.space.parent": 100,
            SpaceMarker.TYPE: 100,
            ChatMarker.TYPE: 100,
        },
    }


@dataclass
class CapabilitiesResponse(Response):
    """``GET /capabilities`` (nio has no call for it): the default room version, if told."""

    default_room_version: str | None = None

    @classmethod
    def from_dict(cls, parsed: dict[str, Any]) -> CapabilitiesResponse | ErrorResponse:
        capabilities = parsed.get("capabilities")
        if "errcode" in parsed or not isinstance(capabilities, dict):
            return ErrorResponse.from_dict(parsed)
        versions = capabilities.get("m.room_versions")
        default = versions.get("default") if isinstance(versions, dict) else None
        return cls(str(default) if default is not None else None)


@dataclass
class RawResponse(Response):
    """An answer nio has no class for, as JSON."""

    body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, parsed: dict[str, Any]) -> RawResponse | ErrorResponse:
        return ErrorResponse.from_dict(parsed) if "errcode" in parsed else cls(parsed)


@dataclass(frozen=True)
class SyncedRoom:
    """What sync has shown of a room, without a request: its type (``m.space``, "" for a room
    without one, None when its create event was not seen), the users joined or invited that it
    showed (members load lazily: maybe not all), and the owner named by a Space marker that
    the bot wrote. Hints only: a heal reads the room's state."""

    room_type: str | None
    members: frozenset[str]
    space_owner: str | None = None


class Homeserver:
    """The bot's calls to the homeserver. Every method does exactly one request, except that
    the first room creation of a process asks for the room version first."""

    def __init__(self, client: AsyncClient, server_name: str) -> None:
        self.client = client
        self.server_name = server_name
        self._room_version: str | None = None
        self._room_version_known = False
        self._room_version_lock = asyncio.Lock()
        self._space_owners: dict[str, str] = {}  # room id -> owner, from sync (note_sync)
        self._swept_types: dict[str, str | None] = {}  # room id -> type, from a sweep
        # With replicas: checks that the work a send belongs to is still this replica's (its
        # room's lease, at the database), raising if not; set by the wiring.
        self.guard: Callable[[], Awaitable[None]] | None = None

    @property
    def bot_id(self) -> str:
        return self.client.user_id

    def synced_room(self, room_id: str) -> SyncedRoom | None:
        """What the syncs so far showed of a room (no request); None if they did not show it."""
        owner = self._space_owners.get(room_id)
        room = self.client.rooms.get(room_id)
        if room is not None:
            return SyncedRoom(
                room.room_type, frozenset(room.users) | frozenset(room.invited_users), owner
            )
        if room_id in self._swept_types:
            return SyncedRoom(self._swept_types[room_id], frozenset(), owner)
        return None

    def note_sync(self, resp: SyncResponse) -> None:
        """Keep the owner of each Space marker the bot wrote that a sync round shows. nio keeps
        no custom state, and with lazily loaded members sync rarely shows a Space's owner
        (a first sync gives every room's state but members only of the timeline's senders)."""
        for room_id, info in resp.rooms.join.items():
            self._note_markers(room_id, (ev.source for ev in (*info.state, *info.timeline.events)))

    def note_room(self, room_id: str, room_type: str | None, state: Iterable[dict]) -> None:
        """What a start's sweep saw of a room that nio's sync did not: its type and state."""
        self._swept_types[room_id] = room_type
        self._note_markers(room_id, state)

    def _note_markers(self, room_id: str, events: Iterable[dict]) -> None:
        for raw in events:
            if (
                raw.get("type") != SpaceMarker.TYPE
                or raw.get("state_key") != ""
                or raw.get("sender") != self.bot_id
            ):
                continue
            try:
                marker = SpaceMarker.parse(raw.get("content") or {})
            except MalformedMarker:
                marker = None  # the heal refuses it, with the reason
            if marker is None:
                self._space_owners.pop(room_id, None)
            else:
                self._space_owners[room_id] = marker.owner

    async def _call(self, what: str, request: Callable[[], Awaitable[Any]], ok: type[R]) -> R:
        for attempt in range(MAX_SHORT_RATE_LIMIT_RETRIES + 1):
            try:
                resp = await request()
            except (TimeoutError, ClientError, OSError) as err:
                raise HomeserverError(what, "unreachable", type(err).__name__) from err
            if isinstance(resp, ok):
                return resp
            if not isinstance(resp, ErrorResponse):
                raise HomeserverError(what, "unexpected", type(resp).__name__)
            retry_after = getattr(resp, "retry_after_ms", None)
            if (
                resp.status_code == "M_LIMIT_EXCEEDED"
                and retry_after is not None
                and retry_after <= SHORT_RATE_LIMIT_MS
                and attempt < MAX_SHORT_RATE_LIMIT_RETRIES
            ):
                await asyncio.sleep(retry_after / 1000)  # a short limit is absorbed here
                continue
            transport = resp.transport_response
            raise HomeserverError(
                what,
                str(resp.status_code or ""),
                resp.message or "",
                retry_after,
                transport.status if transport else None,
            )
        raise AssertionError("unreachable")

    async def get_state(self, room_id: str) -> list[dict]:
        resp = await self._call(
            "get room state", lambda: self.client.room_get_state(room_id), RoomGetStateResponse
        )
        return resp.events

    async def joined_rooms(self) -> list[str]:
        resp = await self._call(
            "list joined rooms", lambda: self.client.joined_rooms(), JoinedRoomsResponse
        )
        return resp.rooms

    async def join(self, room_id: str) -> None:
        await self._call("join", lambda: self.client.join(room_id), JoinResponse)

    async def leave(self, room_id: str) -> None:
        await self._call("leave", lambda: self.client.room_leave(room_id), RoomLeaveResponse)

    async def invite(self, room_id: str, user_id: str) -> None:
        await self._call(
            "invite", lambda: self.client.room_invite(room_id, user_id), RoomInviteResponse
        )

    async def put_state(
        self, room_id: str, event_type: str, content: dict, state_key: str = ""
    ) -> None:
        await self._call(
            f"set {event_type}",
            lambda: self.client.room_put_state(room_id, event_type, content, state_key),
            RoomPutStateResponse,
        )

    async def default_room_version(self) -> str | None:
        """The version the server creates rooms at by default (None: it does not say)."""
        resp = await self._call(
            "get capabilities",
            lambda: self.client._send(
                CapabilitiesResponse, "GET", Api._build_path(["capabilities"])
            ),
            CapabilitiesResponse,
        )
        return resp.default_room_version

    async def room_version(self) -> str | None:
        """The version the bot creates rooms at: the server's default, asked on first use
        (never at startup) and kept for the life of the process."""
        async with self._room_version_lock:
            if not self._room_version_known:
                self._room_version = await self.default_room_version()
                self._room_version_known = True
            return self._room_version

    async def _create_room(self, what: str, owner: str, **options: Any) -> str:
        # The version is named in the request, so the power levels always match the room,
        # even if the server's default changes while the bot runs.
        version = await self.room_version()
        try:
            resp = await self._call(
                what,
                lambda: self.client.room_create(
                    visibility=RoomVisibility.private,
                    preset=RoomPreset.private_chat,
                    room_version=version,
                    invite=[owner],
                    power_level_override=power_levels(owner, self.bot_id, version),
                    **options,
                ),
                RoomCreateResponse,
            )
        except HomeserverError as err:
            if err.status == "M_UNSUPPORTED_ROOM_VERSION":  # ask the server again next time
                self._room_version_known = False
            raise
        return resp.room_id

    async def create_space(self, owner: str) -> str:
        """A Space owned by ``owner``, carrying its marker from the first event; owner invited."""
        return await self._create_room(
            "create space",
            owner,
            name=SPACE_NAME,
            space=True,
            initial_state=[SpaceMarker(owner).state_event()],
        )

    async def create_chat_room(self, owner: str, space_id: str, chat_id: str, title: str) -> str:
        """A chat room with its marker and ``m.space.parent`` set at creation; owner invited."""
        return await self._create_room(
            "create chat room",
            owner,
            name=title,
            initial_state=[
                ChatMarker(owner, chat_id, "active").state_event(),
                {
                    "type": "m.space.parent",
                    "state_key": space_id,
                    "content": {"via": [self.server_name], "canonical": True},
                },
            ],
        )

    async def link_child(self, space_id: str, room_id: str) -> None:
        await self.put_state(space_id, "m.space.child", {"via": [self.server_name]}, room_id)

    async def unlink_child(self, space_id: str, room_id: str) -> None:
        await self.put_state(space_id, "m.space.child", {}, room_id)

    async def set_chat_marker(
        self, room_id: str, owner: str, chat_id: str, status: ChatStatus
    ) -> None:
        marker = ChatMarker(owner, chat_id, status)
        await self.put_state(room_id, marker.TYPE, marker.content(), marker.STATE_KEY)

    async def set_name(self, room_id: str, name: str) -> None:
        await self.put_state(room_id, "m.room.name", {"name": name})

    async def messages(
        self,
        room_id: str,
        start: str | None,
        end: str | None,
        limit: int,
        types: list[str],
        *,
        forward: bool = False,
        senders: list[str] | None = None,
    ) -> tuple[list[dict], str | None]:
        """One page of ``/messages`` from ``start`` (None: the room's latest event) towards
        ``end``, backwards unless ``forward``: the raw events in that order, and the next
        page's token (None at the end)."""
        event_filter: dict[str, Any] = {"types": types}
        if senders is not None:
            event_filter["senders"] = senders
        direction = MessageDirection.front if forward else MessageDirection.back
        resp = await self._call(
            "read messages",
            lambda: self.client.room_messages(room_id, start, end, direction, limit, event_filter),
            RoomMessagesResponse,
        )
        return [ev.source for ev in resp.chunk], resp.end if resp.chunk else None

    async def latest(
        self, room_id: str, limit: int, types: list[str]
    ) -> tuple[list[dict], str, bool]:
        """A room's latest ``limit`` events of ``types`` (``/messages`` backwards from the end):
        the raw events, newest first; the position they were read from (a token for
        ``/messages`` in this room); and whether older ones exist."""
        resp = await self._call(
            "read latest messages",
            lambda: self.client.room_messages(
                room_id, None, None, MessageDirection.back, limit, {"types": types}
            ),
            RoomMessagesResponse,
        )
        return [ev.source for ev in resp.chunk], resp.start, bool(resp.end and resp.chunk)

    async def messages_after(
        self, room_id: str, event_id: str, limit: int, senders: list[str]
    ) -> tuple[list[dict], str | None]:
        """Up to ``limit`` messages of ``senders`` right after ``event_id`` (``/context``, which
        nio offers without a filter; Synapse gives half its ``limit`` to each side): the raw
        events, oldest first, and the token to read on forwards."""
        event_filter = json.dumps({"types": ["m.room.message"], "senders": senders})
        path = Api._build_path(
            ["rooms", room_id, "context", event_id], {"limit": 2 * limit, "filter": event_filter}
        )
        resp = await self._call(
            "read messages after",
            lambda: self.client._send(RoomContextResponse, "GET", path, response_data=(room_id,)),
            RoomContextResponse,
        )
        return [ev.source for ev in resp.events_after], resp.end

    async def sliding_sync(
        self, conn_id: str, lists: dict[str, Any], pos: str | None
    ) -> dict[str, Any]:
        """One simplified sliding sync request (MSC4186) on connection ``conn_id``, answered
        at once: the raw answer."""
        query = {"timeout": 0, **({"pos": pos} if pos is not None else {})}
        path = Api._build_path(
            ["org.matrix.simplified_msc3575", "sync"], query, base_path=UNSTABLE_API_PATH
        )
        body = json.dumps({"conn_id": conn_id, "lists": lists})
        resp = await self._call(
            "sliding sync",
            lambda: self.client._send(RawResponse, "POST", path, data=body),
            RawResponse,
        )
        return resp.body

    async def typing(self, room_id: str, on: bool, timeout_ms: int = 30_000) -> None:
        await self._call(
            "typing", lambda: self.client.room_typing(room_id, on, timeout_ms), RoomTypingResponse
        )

    async def send(self, room_id: str, content: dict[str, Any], txn_id: str | None = None) -> str:
        """Send an ``m.room.message``; returns its event id."""
        if self.guard is not None:
            await self.guard()
        resp = await self._call(
            "send message",
            lambda: self.client.room_send(room_id, "m.room.message", content, tx_id=txn_id),
            RoomSendResponse,
        )
        return resp.event_id

    async def appservice_ping(self, appservice_id: str, txn_id: str) -> int:
        """Ask the homeserver to ping the appservice's listener (and so to retry at once the
        transactions it holds for it); returns the round trip it measured, in ms."""
        path = Api._build_path(
            ["appservice", appservice_id, "ping"], base_path="/_matrix/client/v1"
        )
        body = json.dumps({"transaction_id": txn_id})
        resp = await self._call(
            "ping the appservice",
            lambda: self.client._send(RawResponse, "POST", path, data=body),
            RawResponse,
        )
        return int(resp.body.get("duration_ms") or 0)
