"""Chatting: the owner's text goes to the agent; a room rename in the client renames the chat."""

from __future__ import annotations

import structlog

from adapter.matrix.context import EventData, Update
from adapter.matrix.room_router import ChatRoute, LobbyRoute
from core.chat import InvalidTitle

log = structlog.get_logger()

LOBBY_HINT = ("This is your lobby. Chat with me in the rooms of your Lambda Space; "
              "send !chats to list them, !new to start one, or !help.")
ARCHIVED_HINT = "This chat is archived. Send !new to start a new chat."
ENCRYPTED_HINT = ("I can't read encrypted messages. Please write to me in the chat rooms of "
                  "your Lambda Space (they are not encrypted), or in an unencrypted room.")


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
    answer = await svc.agent.reply(chat, update.body)
    await svc.reply(update, answer, notice=False)
    log.info("message.answered", room_id=update.room_id, chat_id=chat.chat_id,
             event_id=update.event_id)


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
    log.info("message.encrypted", room_id=update.room_id, event_id=update.event_id)
    await data["services"].reply(update, ENCRYPTED_HINT)
