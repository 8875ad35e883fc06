"""The healing link of the dispatcher chain (SPEC §6): the local DB is a cache and the
homeserver the truth. The link decides when to heal, so that handlers after it see complete
records; fetching and deciding is done by ``healer.Healer``, and what the user is told by
``notices``."""

from __future__ import annotations

from adapter.matrix.chain.context import EventData, Services
from adapter.matrix.chain.dispatcher import Handler
from adapter.matrix.chain.notices import RefusalNotices, postpone
from adapter.matrix.chain.router import ChatRoute, LobbyRoute, Unregistered
from adapter.matrix.healing.healer import Healer
from adapter.matrix.healing.room_state import HealRefused
from adapter.matrix.homeserver.client import HomeserverError
from adapter.matrix.ingest.update import Update
from adapter.matrix.store.records import knows_a_chat
from core.chat import Chat, ChatNotFound

FAILURE_NOTICE = (
    "I couldn't reach my homeserver to look up this room. "
    "I'll retry and answer your message when it is back."
)


class HealingMiddleware:
    """Makes sure the handler sees complete records: route, chat and (when needed) the Space.

    A refused room stops the update (``RefusalNotices`` may tell the user); a homeserver
    error postpones it (``postpone``: the inbox retries it with backoff).
    """

    def __init__(self, healer: Healer, notices: RefusalNotices | None = None) -> None:
        self.healer = healer
        self.notices = notices or RefusalNotices()

    async def __call__(self, handler: Handler, update: Update, data: EventData) -> None:
        try:
            await self._complete(update, data)
        except HealRefused as refusal:
            await self.notices.tell(update, refusal, data["services"])
            return
        except HomeserverError as err:
            await postpone(update, err, data["services"], FAILURE_NOTICE)
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
                if update.kind == "encrypted":  # the room's encryption says what to answer
                    data["unreadable"] = await self.healer.unreadable(room_id)
        owner = update.sender if update.kind == "invite" else getattr(data["route"], "owner", None)
        # Heal the Space only for its owner: a non-owner's event is dropped by the next link.
        if owner == update.sender and self._needs_space(update, data):
            data["user"] = await self.healer.user_space(owner)
            if data["user"] is not None and await self._lists_space(update, data):
                await self.healer.heal_space_children(data["user"].space_id)

    async def _chat_of(self, route: ChatRoute, svc: Services) -> Chat:
        assert route.meta.chat_id is not None  # RoomRouter routes a room without one elsewhere
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
        """An invite, or a message in the lobby (which completes an onboarding cut short), an
        encrypted one included (a lobby its owner's client encrypts)."""
        return update.kind == "invite" or (
            update.kind in ("message", "encrypted") and isinstance(data["route"], LobbyRoute)
        )

    def _needs_space(self, update: Update, data: EventData) -> bool:
        command = data.get("command")
        return self._onboarding(update, data) or (command is not None and command.spec.needs_space)

    async def _lists_space(self, update: Update, data: EventData) -> bool:
        """``!chats`` lists, and onboarding looks for, every chat of the Space: an invite
        always; a lobby message only when the DB knows no chat of the user (a loss or a crash)."""
        command = data.get("command")
        if command is not None and command.spec.lists_space or update.kind == "invite":
            return True
        svc = data["services"]
        return self._onboarding(update, data) and not await knows_a_chat(
            svc.store, svc.chats, update.sender
        )
