"""What the chain hands each link and handler: the bot's services and the typed data beside an
update (the update itself is ``ingest.update.Update``)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypedDict

import structlog

from adapter.matrix.chain.access import Access
from adapter.matrix.chain.command_table import Command
from adapter.matrix.chain.router import RoomRouter, Route
from adapter.matrix.config import DEFAULT_CONCURRENCY
from adapter.matrix.conversation.history import Conversations
from adapter.matrix.homeserver.client import Homeserver, HomeserverError
from adapter.matrix.ingest.update import Update
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.metrics import Metrics
from adapter.matrix.store.records import EncryptedRoom, MatrixStore, UserMeta
from adapter.matrix.vocabulary.content import message_content, reply_txn_id
from core.agent import Agent
from core.chat import Chat, ChatManager

log = structlog.get_logger()


@dataclass(frozen=True)
class Services:
    hs: Homeserver
    store: MatrixStore
    chats: ChatManager
    agent: Agent
    router: RoomRouter
    access: Access
    conversation: Conversations
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    # At most LAMBDA_CONCURRENCY agent calls at once: held by the call alone, so a room that
    # waits on the homeserver (a heal, a send, a retry) never keeps another room's answer back.
    agent_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(DEFAULT_CONCURRENCY)
    )
    # Rooms are handled concurrently; one user's bootstrap (two invites, say) is serialized.
    bootstrap_locks: defaultdict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    # With replicas: a lease named for the block (``Leases.holding``), so what is serialized
    # here is across the replicas too; None: one process.
    shared_lock: Callable[[str], AbstractAsyncContextManager[None]] | None = None

    @asynccontextmanager
    async def one_at_a_time(self, user_id: str) -> AsyncIterator[None]:
        """One user's onboarding and room creation, one at a time (across replicas too)."""
        async with self.bootstrap_locks[user_id]:
            if self.shared_lock is None:
                yield
            else:
                async with self.shared_lock(f"user:{user_id}"):
                    yield

    @property
    def bot_id(self) -> str:
        return self.hs.bot_id

    async def reply(
        self,
        update: Update,
        body: str,
        *,
        html: str | None = None,
        part: str = "reply",
        notice: bool = True,
        provisional: bool = False,
    ) -> None:
        """Answer ``update`` in its room; the transaction id is derived from its event id. An
        answer that does not directly follow its question (after a burst, a catch-up or a
        retry) is a rich reply to it."""
        rich = update.is_event and (
            update.catchup
            or update.may_be_answered
            or not self.conversation.follows(update.room_id, update.event_id)
        )
        content = message_content(
            body,
            html=html,
            notice=notice,
            source_event_id=update.event_id,
            provisional=provisional,
            reply_to=update.event_id if rich else None,
        )
        event_id = await self.hs.send(update.room_id, content, reply_txn_id(update.event_id, part))
        self.conversation.sent(update.room_id, event_id, content)

    async def try_reply(
        self, update: Update, body: str, part: str, provisional: bool = False
    ) -> None:
        """A notice about a failure or refusal: if even that cannot be sent, log it.
        ``provisional``: it promises the answer (a retry), it is not the answer."""
        try:
            await self.reply(update, body, part=part, provisional=provisional)
        except HomeserverError as err:
            log.warning(
                "reply.failed", room_id=update.room_id, event_id=update.event_id, error=str(err)
            )


class EventData(TypedDict, total=False):
    services: Services
    route: Route
    command: Command | None
    chat: Chat | None  # the chat of a ChatRoute, after healing
    user: UserMeta | None  # the sender's Space, when the handler needs it
    unreadable: EncryptedRoom | None  # for an encrypted event in a chat room: it is encrypted
