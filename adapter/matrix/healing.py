"""The healing link of the dispatcher chain (SPEC §6): the local DB is a cache and the
homeserver the truth. Handlers after this link see complete records; fetching and
deciding is done by ``healer.Healer``."""

from __future__ import annotations

import time

import structlog

from adapter.matrix.context import EventData, Services, Update
from adapter.matrix.delivery import RetryLater
from adapter.matrix.dispatcher import Handler
from adapter.matrix.healer import Healer
from adapter.matrix.homeserver import HomeserverError
from adapter.matrix.room_router import ChatRoute, LobbyRoute, Unregistered
from adapter.matrix.room_state import HealRefused
from core.chat import Chat, ChatNotFound

log = structlog.get_logger()

REFUSAL_NOTICE_EVERY_S = 3600.0
FAILURE_NOTICE = ("I couldn't reach my homeserver to look up this room. "
                  "I'll retry and answer your message when it is back.")


class HealingMiddleware:
    """Makes sure the handler sees complete records: route, chat and (when needed) the Space.

    Refused rooms get at most one notice an hour. On a homeserver error the user is told
    once, and the update stays in the inbox, which retries it with backoff (``RetryLater``).
    """

    def __init__(self, healer: Healer) -> None:
        self.healer = healer
        self._refusal_noticed: dict[str, float] = {}

    async def __call__(self, handler: Handler, update: Update, data: EventData) -> None:
        try:
            await self._complete(update, data)
        except HealRefused as refusal:
            await self._notice_refusal(update, refusal, data["services"])
            return
        except HomeserverError as err:
            if update.attempt == 0 and update.kind != "invite":
                await data["services"].try_reply(update, FAILURE_NOTICE, part="retry-notice")
            raise RetryLater(str(err), err.retry_after_ms) from err
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
            if data["user"] is not None and await self._lists_space(update, data):
                await self.healer.heal_space_children(data["user"].space_id)

    async def _chat_of(self, route: ChatRoute, svc: Services) -> Chat:
        try:
            return await svc.chats.get(route.owner, route.meta.chat_id)
        except ChatNotFound:
            # The room record exists but its chat does not: the two stores disagree.
            plan = await self.healer.heal_room(route.room_id)
            if plan.chat is None:
                raise HealRefused("unknown_room") from None
            return plan.chat

    @staticmethod
    def _onboarding(update: Update, data: EventData) -> bool:
        """An invite, or a message in the lobby (which completes an onboarding cut short)."""
        return update.kind == "invite" or (
            update.kind == "message" and isinstance(data["route"], LobbyRoute))

    def _needs_space(self, update: Update, data: EventData) -> bool:
        command = data.get("command")
        return self._onboarding(update, data) or (
            command is not None and command.spec.needs_space)

    async def _lists_space(self, update: Update, data: EventData) -> bool:
        """``!chats`` lists, and onboarding looks for, every chat of the Space: an invite
        always; a lobby message only when the DB knows no chat of the user (a loss or a crash)."""
        command = data.get("command")
        if command is not None and command.spec.lists_space or update.kind == "invite":
            return True
        return self._onboarding(update, data) and not await data["services"].store.chat_rooms_of(
            update.sender)

    async def _notice_refusal(self, update: Update, refusal: HealRefused, svc: Services) -> None:
        last = self._refusal_noticed.get(update.room_id, float("-inf"))
        # Invites and catch-up messages (history that might have been answered) get no notice.
        if update.kind == "invite" or update.catchup \
                or time.monotonic() - last < REFUSAL_NOTICE_EVERY_S:
            log.info("event.ignored", reason=refusal.reason, room_id=update.room_id,
                     event_id=update.event_id)
            return
        self._refusal_noticed[update.room_id] = time.monotonic()
        await svc.try_reply(update, refusal.user_message, part="refusal")
