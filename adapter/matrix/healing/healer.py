"""The healing I/O shell (SPEC §6): fetch a room's state, decide with
``room_state.assess_room``, write every implied record in one transaction, log it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

import structlog

from adapter.matrix.healing.encryption import announce
from adapter.matrix.healing.room_state import (
    HealCause,
    HealPlan,
    HealRefused,
    RoomSnapshot,
    assess_room,
    heal_cause,
    parent_to_verify,
    unreadable_room,
)
from adapter.matrix.homeserver.client import Homeserver, HomeserverError
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import EncryptedRoom, MatrixStore, UserMeta
from adapter.matrix.vocabulary.content import SPACE_TYPE
from core.chat import ChatManager, ChatNotFound

log = structlog.get_logger()

REFUSAL_MEMORY_S = 600.0
SPACE_HEAL_CONCURRENCY = 8


class HealingServices(Protocol):
    """What healing uses of the bot's services (the chain's ``Services`` is one)."""

    @property
    def hs(self) -> Homeserver: ...
    @property
    def store(self) -> MatrixStore: ...
    @property
    def chats(self) -> ChatManager: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def bot_id(self) -> str: ...


class Healer:
    """Backfills local records from room state. Single-flight per room; refusals remembered."""

    def __init__(self, svc: HealingServices) -> None:
        self.svc = svc
        self._inflight: dict[str, asyncio.Task] = {}
        self._refused: dict[str, tuple[HealRefused, float]] = {}

    def cause(self, created_at: float = 0.0, held: bool = False) -> HealCause:
        """The cause a heal logs, by ``room_state.heal_cause`` over this DB's birth."""
        return heal_cause(self.svc.store.birth, created_at, held)

    async def _holds_chat(self, plan: HealPlan) -> bool:
        """Whether the DB still holds the chat record of the room the plan restores."""
        if plan.chat is None:
            return False
        try:
            await self.svc.chats.get(plan.chat.user_id, plan.chat.chat_id)
            return True
        except ChatNotFound:
            return False

    def _single_flight(self, key: str, work: Callable[[], Awaitable]) -> Awaitable:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return asyncio.shield(task)

    async def heal_room(self, room_id: str) -> HealPlan:
        """Restore the records of one room, or raise ``HealRefused`` / ``HomeserverError``."""
        remembered = self._refused.get(room_id)
        if remembered is not None:
            if remembered[1] > time.monotonic():
                raise remembered[0]
            del self._refused[room_id]
        return await self._single_flight(room_id, lambda: self._heal_room(room_id))

    async def _heal_room(self, room_id: str) -> HealPlan:
        started, bot = time.monotonic(), self.svc.bot_id
        # Part of the room's own records still in the DB: its room record, or (below) its chat.
        held = await self.svc.store.get_room(room_id) is not None
        snap = await self._snapshot(room_id, self.cause(held=held))
        requests = 1
        try:
            parent = None
            if parent_id := parent_to_verify(snap, bot):  # may refuse a forged marker too
                parent = await self._snapshot(
                    parent_id, self.cause(snap.created_at, held), for_room=room_id
                )
                requests += 1
            plan = assess_room(snap, bot, parent)
        except HealRefused as refusal:
            log.warning(
                "state.heal_refused",
                room_id=room_id,
                reason=refusal.reason,
                cause=self.cause(snap.created_at, held),
                hs_requests=requests,
            )
            self._refused[room_id] = (refusal, time.monotonic() + REFUSAL_MEMORY_S)
            self.svc.metrics.heal_refusals.labels(reason=refusal.reason).inc()
            raise
        cause = self.cause(snap.created_at, held or await self._holds_chat(plan))
        restored = await self._write(plan)
        (log.warning if cause == "inconsistent" else log.info)(
            "state.healed",
            room_id=room_id,
            restored=restored,
            source=plan.source,
            cause=cause,
            hs_requests=requests,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
            kind=plan.room.kind,
            owner=plan.room.owner,
        )
        self.svc.metrics.heals.labels(cause=cause, source=plan.source).inc()
        return plan

    async def _snapshot(
        self, room_id: str, cause: HealCause, for_room: str | None = None
    ) -> RoomSnapshot:
        """One state request. A room the bot cannot see gives an empty snapshot, which the
        decision refuses (unknown room, or a foreign parent); other errors are retried later."""
        try:
            events = await self.svc.hs.get_state(room_id)
        except HomeserverError as err:
            if err.status in ("M_FORBIDDEN", "M_NOT_FOUND"):
                return RoomSnapshot(room_id)
            log.warning(
                "state.heal_failed",
                room_id=for_room or room_id,
                error=str(err),
                will_retry=True,
                cause=cause,
            )
            raise
        return RoomSnapshot.from_events(room_id, events)

    async def _write(self, plan: HealPlan) -> list[str]:
        """Write every record the plan implies in one transaction; returns the kinds written."""
        store, owner = self.svc.store, plan.room.owner
        current_user = await store.get_user(owner)
        user = current_user
        if user is None and plan.user is not None:
            lobbies = await store.rooms_of(owner, "lobby")
            user = replace(plan.user, lobby_room_id=lobbies[0][0] if lobbies else None)
        if plan.room.kind == "lobby" and user is not None and user.lobby_room_id is None:
            user = replace(user, lobby_room_id=plan.room_id)
        unreadable = plan.unreadable
        if unreadable is not None and await store.get_encrypted(plan.room_id) is not None:
            unreadable = None  # recorded, and the operator told, before
        restored = ["matrix_room"]
        async with store.transaction() as tx:
            await store.set_room(plan.room_id, plan.room, tx)
            if plan.chat is not None:
                self.svc.chats.restore(plan.chat, tx)
                restored.append("chat")
            if user is not None and user != current_user:
                await store.set_user(owner, user, tx)
                restored.append("matrix_user")
            if unreadable is not None:
                await store.set_encrypted(plan.room_id, unreadable, tx)
                restored.append("encrypted_room")
        if unreadable is not None:
            announce(plan.room_id, unreadable, self.svc.metrics)
        return restored

    async def unreadable(self, room_id: str) -> EncryptedRoom | None:
        """Whether a room the bot made, and the DB knows, is encrypted: the DB's record, or
        else (a room recorded before the bot looked, by an earlier version) its state, read
        once and recorded. None: it is readable, or not the bot's."""
        record = await self.svc.store.get_encrypted(room_id)
        if record is not None:
            return record
        return await self._single_flight(
            f"encryption:{room_id}", lambda: self._learn_encryption(room_id)
        )

    async def _learn_encryption(self, room_id: str) -> EncryptedRoom | None:
        store = self.svc.store
        meta = await store.get_room(room_id)
        if meta is None or meta.kind == "lobby":
            return None
        snap = await self._snapshot(room_id, self.cause(held=True))
        record = unreadable_room(snap, meta.kind, meta.owner)
        if record is not None and await store.get_encrypted(room_id) is None:
            await store.set_encrypted(room_id, record)
            announce(room_id, record, self.svc.metrics)
        return record

    async def user_space(self, user_id: str) -> UserMeta | None:
        """The user's Space record; healed from the server if missing. None: they have none."""
        meta = await self.svc.store.get_user(user_id)
        if meta is not None:
            return meta
        await self._single_flight(f"user:{user_id}", lambda: self._find_space(user_id))
        return await self.svc.store.get_user(user_id)

    async def _find_space(self, user_id: str) -> None:
        # Cheapest first: a Space the cache still knows, then the bot's joined rooms that
        # sync showed to be Spaces (the user's first, by the marker or the members sync showed;
        # none whose marker names another user), then joined rooms of unknown type. Each is
        # verified by state.
        for room_id in await self._space_candidates(user_id):
            try:
                plan = await self.heal_room(room_id)
            except HealRefused:
                continue
            if plan.room.kind == "space" and plan.room.owner == user_id:
                return

    async def _space_candidates(self, user_id: str) -> list[str]:
        store = self.svc.store
        local = [rid for rid, _ in await store.rooms_of(user_id, "space")]
        if local:
            return local
        known = {rid for rid, _ in await store.rooms()}
        try:
            joined = await self.svc.hs.joined_rooms()
        except HomeserverError as err:
            log.warning(
                "state.heal_failed",
                room_id=None,
                user_id=user_id,
                error=str(err),
                will_retry=True,
                cause=self.cause(),
            )
            raise
        spaces: list[str] = []
        unknown: list[str] = []
        for room_id in joined:
            if room_id in known:
                continue
            room = self.svc.hs.synced_room(room_id)
            if room is not None and room.room_type == SPACE_TYPE:
                if room.space_owner == user_id or user_id in room.members:
                    spaces.insert(0, room_id)
                elif room.space_owner is None:  # no marker: a Space from before markers
                    spaces.append(room_id)
                # Else the bot's marker names someone else: sync showed its create event, so
                # its whole state, and a heal would only say it is not this user's.
            elif room is None or room.room_type is None:
                unknown.append(room_id)
        return spaces + unknown

    async def heal_space_children(self, space_id: str) -> None:
        """Heal every current and former child of the Space that has no complete local record
        (for ``!chats``, whose archived count includes the unlinked children)."""
        snap = await self._snapshot(space_id, self.cause())
        missing = [
            rid
            for rid in snap.children(self.svc.bot_id, former=True)
            if not await self._complete(rid)
        ]
        if not missing:
            return
        gate = asyncio.Semaphore(SPACE_HEAL_CONCURRENCY)

        async def heal(room_id: str) -> None:
            async with gate:
                try:
                    await self.heal_room(room_id)
                except HealRefused:
                    pass  # logged by heal_room; the other chats still list

        await asyncio.gather(*(heal(rid) for rid in missing))

    async def _complete(self, room_id: str) -> bool:
        meta = await self.svc.store.get_room(room_id)
        if meta is None or meta.kind != "chat" or meta.chat_id is None:
            return meta is not None
        try:
            await self.svc.chats.get(meta.owner, meta.chat_id)
            return True
        except ChatNotFound:
            return False
