"""Chatting: the owner's text goes to the agent; a room rename in the client renames the chat."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import replace

import structlog

from adapter.matrix.chain.context import EventData
from adapter.matrix.chain.router import ChatRoute, LobbyRoute
from adapter.matrix.conversation.markdown import render
from adapter.matrix.handlers.chat_rooms import matrix_to
from adapter.matrix.healing.encryption import (
    CANNOT_READ_MESSAGES,
    ROOM_ENCRYPTED,
    WITHOUT_ENCRYPTION,
    WRITE_IN_CHAT,
    admin_can_fix,
    readable_active_chats,
)
from adapter.matrix.homeserver.client import Homeserver, HomeserverError
from adapter.matrix.ingest.update import Update
from core.agent import Turn, agent_timeout, wants_history
from core.chat import InvalidTitle

log = structlog.get_logger()

LOBBY_HINT = (
    "This is your lobby. Chat with me in the rooms of your Lambda Space; "
    "send !chats to list them, !new to start one, or !help."
)
ARCHIVED_HINT = "This chat is archived. Send !new to start a new chat."
AGENT_FAILED = (
    "Sorry, I couldn't come up with an answer to that just now (the assistant "
    "failed). Please try again."
)
MISSED = (
    "I was away and missed {n} older messages in this room, which I could not answer. "
    "If one of them still needs an answer, please send it again."
)
TYPING_MS = 30_000


async def handle_text(update: Update, data: EventData) -> None:
    svc, route = data["services"], data["route"]
    if isinstance(route, LobbyRoute):
        await svc.reply(update, LOBBY_HINT)
        return
    chat = data.get("chat")
    if not isinstance(route, ChatRoute) or chat is None:
        return
    if chat.status == "archived":
        await svc.reply(update, ARCHIVED_HINT)
        return
    async with typing(svc.hs, update.room_id):
        extra = {}
        if wants_history(svc.agent):  # read before the agent runs: a read may be retried
            extra["history"] = await _history(update, data)
        try:
            async with svc.agent_slots:  # the agent's call alone holds a slot, not the room
                answer = await asyncio.wait_for(
                    svc.metrics.timed_agent_call(svc.agent.reply(chat, update.body, **extra)),
                    agent_timeout(svc.agent),
                )
        except Exception as err:  # third-party code: any failure is told, never retried
            log.error(
                "agent.failed",
                room_id=update.room_id,
                event_id=update.event_id,
                error=str(err) or type(err).__name__,
                exc_info=not isinstance(err, TimeoutError),
            )
            await svc.reply(update, AGENT_FAILED)
            return
        answer = str(answer)
        await svc.reply(update, answer, html=render(answer), notice=False)
    log.info(
        "message.answered",
        room_id=update.room_id,
        chat_id=chat.chat_id,
        event_id=update.event_id,
        catchup=update.catchup,
        attempt=update.attempt,
        history=len(extra.get("history", ())),
    )
    svc.metrics.answered(update.ts)


async def _history(update: Update, data: EventData) -> list[Turn]:
    """The conversation before ``update``. A homeserver that fails for now postpones the
    answer (the inbox retries it); one that refuses for good gets an answer without it."""
    svc, route = data["services"], data["route"]
    assert isinstance(route, ChatRoute)  # handle_text asks only in a chat room
    try:
        return await svc.conversation.history(
            update.room_id, route.owner, update.event_id, update.ts
        )
    except HomeserverError as err:
        if err.transient:
            raise
        log.warning(
            "conversation.read_failed",
            room_id=update.room_id,
            event_id=update.event_id,
            error=str(err),
        )
        return []


@asynccontextmanager
async def typing(hs: Homeserver, room_id: str) -> AsyncIterator[None]:
    """Show the bot typing in the room, renewed until the block ends. Best effort: a typing
    notice that fails is logged, never an error for the reply."""

    async def keep_typing() -> None:
        while True:
            try:
                await hs.typing(room_id, True, TYPING_MS)
            except HomeserverError as err:
                log.debug("typing.failed", room_id=room_id, error=str(err))
            await asyncio.sleep(TYPING_MS / 1000 * 2 / 3)

    task = asyncio.create_task(keep_typing())
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        with suppress(HomeserverError):
            await hs.typing(room_id, False)


async def handle_room_name(update: Update, data: EventData) -> None:
    """The owner renamed the room in their client: the chat title follows."""
    svc, route, chat = data["services"], data["route"], data.get("chat")
    if not isinstance(route, ChatRoute) or chat is None or update.body == chat.title:
        return
    try:
        chat = await svc.chats.rename(route.owner, chat.chat_id, update.body)
    except InvalidTitle as err:
        log.info("chat.rename_ignored", room_id=update.room_id, reason=str(err))
        return
    log.info("chat.renamed", room_id=update.room_id, chat_id=chat.chat_id, source="client")


async def handle_encrypted(update: Update, data: EventData) -> None:
    """An encrypted message, which the bot cannot read. In a chat room the homeserver encrypted
    (``data["unreadable"]``), its owner is told so once; elsewhere, where to write instead,
    claiming no room is unencrypted unless its state said so."""
    svc, route = data["services"], data["route"]
    log.info("message.encrypted", room_id=update.room_id, event_id=update.event_id)
    unreadable = data.get("unreadable")
    if isinstance(route, ChatRoute) and unreadable is not None:
        if unreadable.user_told:
            log.info(
                "event.ignored",
                reason="encrypted_room",
                room_id=update.room_id,
                event_id=update.event_id,
            )
            return
        await svc.reply(update, f"{ROOM_ENCRYPTED}\n{admin_can_fix(in_lobby=False)}")
        await svc.store.set_encrypted(update.room_id, replace(unreadable, user_told=True))
        return
    hint = WITHOUT_ENCRYPTION
    if isinstance(route, LobbyRoute):  # the owner's own room: point to a chat the bot can read
        readable = await readable_active_chats(svc.store, svc.chats, route.owner)
        if readable:
            chat_id, room_id = list(readable.items())[-1]
            chat = await svc.chats.get(route.owner, chat_id)
            hint = WRITE_IN_CHAT.format(
                title=chat.title, chat_link=matrix_to(room_id, svc.hs.server_name)
            )
    await svc.reply(update, CANNOT_READ_MESSAGES + hint)


async def handle_missed(update: Update, data: EventData) -> None:
    """More messages arrived while the bot was away than it backfills: tell the owner."""
    await data["services"].reply(update, MISSED.format(n=update.body))
