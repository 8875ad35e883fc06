"""Lazy self-healing (SPEC §6): the local DB is a cache; the homeserver is the truth.

``Healer`` is the thin I/O shell around ``room_state.assess_room``: fetch, decide, write
in one transaction, log. ``HealingMiddleware`` is its one link in the dispatcher chain.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Literal

import structlog

from adapter.matrix.context import EventData, Services, Update
from adapter.matrix.dispatcher import Handler
from adapter.matrix.homeserver import HomeserverError
from adapter.matrix.room_router import ChatRoute, Unregistered
from adapter.matrix.room_state import (
    SPACE_TYPE,
    HealPlan,
    HealRefused,
    RoomSnapshot,
    assess_room,
    parent_to_verify,
)
from adapter.matrix.store import UserMeta
from core.chat import ChatNotFound

log = structlog.get_logger()

HealCause = Literal["local_reset", "store_missing", "inconsistent"]
REFUSAL_MEMORY_S = 600.0
REFUSAL_NOTICE_EVERY_S = 3600.0
SPACE_HEAL_CONCURRENCY = 8
FAILURE_NOTICE = ("I couldn't reach my homeserver to look up this room. "
                  "I'll retry and answer your message when it is back.")


class Healer:
    """Backfills local records from room state. Single-flight per room; refusals remembered."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self._inflight: dict[str, asyncio.Task] = {}
        self._refused: dict[str, tuple[HealRefused, float]] = {}

    async def cause(self) -> HealCause:
        if await self.svc.store.get_reset_marker() is not None:
            return "local_reset"
        return "store_missing" if self.svc.store.db.created else "inconsistent"

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
        if remembered and remembered[1] > time.monotonic():
            raise remembered[0]
        return await self._single_flight(room_id, lambda: self._heal_room(room_id))

    async def _heal_room(self, room_id: str) -> HealPlan:
        started, cause, requests = time.monotonic(), await self.cause(), 0
        bot = self.svc.bot_id
        try:
            requests += 1
            snap = await self._snapshot(room_id)
            parent = None
            if parent_id := parent_to_verify(snap, bot):
                requests += 1
                parent = await self._snapshot(parent_id)
        except HomeserverError as err:
            log.warning("state.heal_failed", room_id=room_id, error=str(err), will_retry=True,
                        cause=cause, hs_requests=requests)
            raise
        try:
            plan = assess_room(snap, bot, parent)
        except HealRefused as refusal:
            log.warning("state.heal_refused", room_id=room_id, reason=refusal.reason, cause=cause,
                        hs_requests=requests)
            self._refused[room_id] = (refusal, time.monotonic() + REFUSAL_MEMORY_S)
            raise
        restored = await self._write(plan)
        (log.warning if cause == "inconsistent" else log.info)(
            "state.healed", room_id=room_id, restored=restored, source=plan.source, cause=cause,
            hs_requests=requests, duration_ms=round((time.monotonic() - started) * 1000, 1),
            kind=plan.room.kind, owner=plan.room.owner)
        return plan

    async def _snapshot(self, room_id: str) -> RoomSnapshot:
        try:
            return RoomSnapshot.from_events(room_id, await self.svc.hs.get_state(room_id))
        except HomeserverError as err:
            if err.status in ("M_FORBIDDEN", "M_NOT_FOUND"):
                # Not a passing fault: the bot cannot see this room. An empty snapshot
                # makes the decision refuse it (unknown room, or a foreign parent).
                return RoomSnapshot(room_id)
            raise

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
        restored = ["matrix_room"]
        async with store.db.transaction() as tx:
            await store.set_room(plan.room_id, plan.room, tx)
            if plan.chat is not None:
                self.svc.chats.restore(plan.chat, tx)
                restored.append("chat")
            if user is not None and user != current_user:
                await store.set_user(owner, user, tx)
                restored.append("matrix_user")
        return restored

    async def user_space(self, user_id: str) -> UserMeta | None:
        """The user's Space record; healed from the server if missing. None: they have none."""
        meta = await self.svc.store.get_user(user_id)
        if meta is not None:
            return meta
        await self._single_flight(f"user:{user_id}", lambda: self._find_space(user_id))
        return await self.svc.store.get_user(user_id)

    async def _find_space(self, user_id: str) -> None:
        # Cheapest first: a Space the cache still knows, then the bot's joined rooms that
        # sync showed to be Spaces, then joined rooms of unknown type. Each is verified by state.
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
        seen = self.svc.hs.client.rooms
        spaces, unknown = [], []
        for room_id in await self.svc.hs.joined_rooms():
            room = seen.get(room_id)
            if room_id in known:
                continue
            if room is not None and room.room_type == SPACE_TYPE:
                if user_id in room.users or user_id in room.invited_users:
                    spaces.insert(0, room_id)
                else:
                    spaces.append(room_id)
            elif room is None or room.room_type is None:
                unknown.append(room_id)
        return spaces + unknown

    async def heal_space_children(self, space_id: str) -> None:
        """Heal every child of the Space that has no complete local record (for ``!chats``)."""
        snap = RoomSnapshot.from_events(space_id, await self.svc.hs.get_state(space_id))
        missing = [rid for rid in snap.children(self.svc.bot_id) if not await self._complete(rid)]
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


class HealingMiddleware:
    """Makes sure the handler sees complete records: route, chat and (when needed) the Space.

    Refused rooms get at most one notice an hour; on homeserver errors the user is told
    once, and the events are kept and replayed by a background retry.
    """

    MAX_DEFERRED = 50

    def __init__(self, healer: Healer) -> None:
        self.healer = healer
        self.replay: Callable[[Update], Awaitable[None]] | None = None  # set by the bot
        self._refusal_noticed: dict[str, float] = {}
        self._deferred: dict[str, deque[Update]] = {}
        self._failure_noticed: set[str] = set()
        self._retry_tasks: dict[str, asyncio.Task] = {}

    async def __call__(self, handler: Handler, update: Update, data: EventData) -> None:
        try:
            await self._complete(update, data)
        except HealRefused as refusal:
            await self._notice_refusal(update, refusal, data["services"])
            return
        except HomeserverError as err:
            await self._defer(update, err, data["services"])
            return
        await handler(update, data)

    async def _complete(self, update: Update, data: EventData) -> None:
        svc, room_id = data["services"], update.room_id
        if update.kind != "invite":
            if isinstance(data["route"], Unregistered):
                await self.healer.heal_room(room_id)
                data["route"] = await svc.router.resolve(room_id)
            route = data["route"]
            if isinstance(route, ChatRoute):
                data["chat"] = await self._chat_of(route, svc)
        owner = update.sender if update.kind == "invite" else getattr(data["route"], "owner", None)
        # Heal the Space only for its owner: a non-owner's event is dropped by the next link.
        if owner == update.sender and self._needs_space(update, data):
            data["user"] = await self.healer.user_space(owner)
            if data["user"] is not None and self._lists_space(update, data):
                await self.healer.heal_space_children(data["user"].space_id)
        self._failure_noticed.discard(room_id)
        if room_id in self._deferred:
            await self._replay(room_id)

    async def _chat_of(self, route: ChatRoute, svc: Services):
        try:
            return await svc.chats.get(route.owner, route.meta.chat_id)
        except ChatNotFound:
            # The room record exists but its chat does not: the two stores disagree.
            plan = await self.healer.heal_room(route.room_id)
            if plan.chat is None:
                raise HealRefused("unknown_room") from None
            return plan.chat

    @staticmethod
    def _needs_space(update: Update, data: EventData) -> bool:
        command = data.get("command")
        return update.kind == "invite" or (command is not None and command.spec.needs_space)

    @staticmethod
    def _lists_space(update: Update, data: EventData) -> bool:
        """``!chats`` lists, and a returning user's invite looks for, every chat of the Space."""
        command = data.get("command")
        return update.kind == "invite" or (command is not None and command.spec.lists_space)

    async def _notice_refusal(self, update: Update, refusal: HealRefused, svc: Services) -> None:
        last = self._refusal_noticed.get(update.room_id, float("-inf"))
        if update.kind == "invite" or time.monotonic() - last < REFUSAL_NOTICE_EVERY_S:
            log.info("event.ignored", reason=refusal.reason, room_id=update.room_id,
                     event_id=update.event_id)
            return
        self._refusal_noticed[update.room_id] = time.monotonic()
        await _try_send(svc, update, refusal.user_message, "refusal")

    async def _defer(self, update: Update, err: HomeserverError, svc: Services) -> None:
        room_id = update.room_id
        queue = self._deferred.setdefault(room_id, deque(maxlen=self.MAX_DEFERRED))
        queue.append(update)
        log.info("event.deferred", room_id=room_id, event_id=update.event_id, queued=len(queue))
        if room_id not in self._failure_noticed:
            self._failure_noticed.add(room_id)
            await _try_send(svc, update, FAILURE_NOTICE, "retry-notice")
        if room_id not in self._retry_tasks:
            delay = (err.retry_after_ms or 15000) / 1000
            self._retry_tasks[room_id] = asyncio.create_task(self._retry_later(room_id, delay))

    async def _retry_later(self, room_id: str, delay: float) -> None:
        await asyncio.sleep(min(delay, 300))
        self._retry_tasks.pop(room_id, None)
        await self._replay(room_id)

    async def _replay(self, room_id: str) -> None:
        queue = self._deferred.pop(room_id, None)
        task = self._retry_tasks.pop(room_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        while queue and self.replay:
            await self.replay(queue.popleft())


async def _try_send(svc: Services, update: Update, body: str, part: str) -> None:
    try:
        await svc.reply(update, body, part=part)
    except HomeserverError as err:
        log.warning("reply.failed", room_id=update.room_id, error=str(err))
