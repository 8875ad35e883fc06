"""What flows through the dispatcher: the normalised event and the typed data beside it."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, TypedDict

import structlog

from adapter.matrix.chain.access import Access
from adapter.matrix.chain.command_table import Command
from adapter.matrix.config import DEFAULT_CONCURRENCY
from adapter.matrix.transport.homeserver import Homeserver, HomeserverError, reply_txn_id
from adapter.matrix.room_router import RoomRouter, Route
from adapter.matrix.store import MatrixStore, UserMeta
from core.agent import Agent
from core.chat import Chat, ChatManager

log = structlog.get_logger()

UpdateKind = Literal["message", "room_name", "invite", "encrypted", "missed"]


@dataclass(frozen=True)
class Update:
    """One event the bot acts on, normalised from a sync round (see ``ingest``)."""

    kind: UpdateKind
    room_id: str
    sender: str
    event_id: str
    body: str = ""
    ts: int = 0  # origin_server_ts, ms
    catchup: bool = False  # from the first sync after a start without a token (SPEC §5)
    attempt: int = 0  # how many times handling it was postponed (the inbox retries it)

    @property
    def is_command(self) -> bool:
        return self.kind == "message" and self.body.lstrip().startswith("!")


@dataclass(frozen=True)
class Services:
    hs: Homeserver
    store: MatrixStore
    chats: ChatManager
    agent: Agent
    router: RoomRouter
    access: Access
    # At most LAMBDA_CONCURRENCY agent calls at once: held by the call alone, so a room that
    # waits on the homeserver (a heal, a send, a retry) never keeps another room's answer back.
    agent_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(DEFAULT_CONCURRENCY))
    # Rooms are handled concurrently; one user's bootstrap (two invites, say) is serialized.
    bootstrap_locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock))

    @property
    def bot_id(self) -> str:
        return self.hs.bot_id

    async def reply(self, update: Update, body: str, *, html: str | None = None,
                    part: str = "reply", notice: bool = True) -> None:
        """Answer ``update`` in its room; the transaction id is derived from its event id."""
        await self.hs.send(update.room_id, body, html=html, notice=notice,
                           txn_id=reply_txn_id(update.event_id, part),
                           source_event_id=update.event_id)

    async def try_reply(self, update: Update, body: str, part: str) -> None:
        """A notice about a failure or refusal: if even that cannot be sent, log it."""
        try:
            await self.reply(update, body, part=part)
        except HomeserverError as err:
            log.warning("reply.failed", room_id=update.room_id, event_id=update.event_id,
                        error=str(err))


class EventData(TypedDict, total=False):
    services: Services
    route: Route
    command: Command | None
    chat: Chat | None  # the chat of a ChatRoute, after healing
    user: UserMeta | None  # the sender's Space, when the handler needs it
