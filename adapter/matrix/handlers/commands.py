"""Chat-management commands: ``!new``, ``!rename``, ``!archive``/``!confirm``/``!cancel``,
``!chats``, ``!help``: what each one of the command table (``adapter.matrix.chain.command_table``)
runs. Handlers read the healed context; they never heal themselves."""

from __future__ import annotations

import html
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext

import structlog

from adapter.matrix.chain.command_table import COMMANDS, UNKNOWN, Command
from adapter.matrix.chain.context import EventData, Services
from adapter.matrix.chain.router import ChatRoute
from adapter.matrix.handlers.chat_rooms import create_chat, matrix_to
from adapter.matrix.healing.encryption import (
    CHAT_ENCRYPTED,
    NEW_HELD,
    admin_can_fix,
    holding_room,
)
from adapter.matrix.ingest.update import Update
from adapter.matrix.store.records import Pending
from core.chat import Chat, InvalidTitle, validate_title

log = structlog.get_logger()

CONFIRM_TTL_S = 300
NO_SPACE = "You don't have a Lambda Space yet. Invite me to a room and I'll set one up."

Run = Callable[[Command, Update, EventData], Awaitable[None]]


async def _say(update: Update, data: EventData, body: str, html_body: str | None = None) -> None:
    await data["services"].reply(update, body, html=html_body)


def _in_lobby(data: EventData) -> bool:
    return not isinstance(data["route"], ChatRoute)


def _chat_context(data: EventData) -> tuple[Services, ChatRoute, Chat]:
    """For commands without ``in_lobby``: ``handle_command`` has checked the route."""
    route, chat = data["route"], data.get("chat")
    assert isinstance(route, ChatRoute) and chat is not None
    return data["services"], route, chat


async def cmd_help(cmd: Command, update: Update, data: EventData) -> None:
    lines = [f"{spec.usage} — {spec.summary}" for spec in COMMANDS.values()]
    await _say(update, data, "Commands:\n" + "\n".join(lines))


async def cmd_unknown(cmd: Command, update: Update, data: EventData) -> None:
    await _say(update, data, f"Unknown command !{cmd.name}. Send !help to see what I can do.")


async def cmd_new(cmd: Command, update: Update, data: EventData) -> None:
    svc, owner, user = data["services"], update.sender, data.get("user")
    if user is None:
        await _say(update, data, NO_SPACE)
        return
    if cmd.args.strip():
        try:
            title = validate_title(cmd.args)
        except InvalidTitle as err:
            await _say(update, data, f"{err} Usage: {cmd.spec.usage}")
            return
    else:
        title = f"Chat {len(await svc.chats.list_all(owner)) + 1}"
    if await holding_room(svc.store, svc.chats, owner) is not None:
        # The last room made for them came back encrypted: the next would too, until the
        # homeserver's admin changes it (then a lobby message or an invite tries again).
        log.info("command.refused", room_id=update.room_id, command="new", owner=owner, why="held")
        await _say(update, data, f"{NEW_HELD}\n{admin_can_fix(_in_lobby(data))}")
        return
    shared = svc.shared_lock is not None  # replicas: the throttle's stamps are in the store
    async with svc.one_at_a_time(owner) if shared else nullcontext():
        now = time.time() if shared else None
        if shared:
            svc.access.restore(owner, await svc.store.get_creations(owner))
        active = len(await svc.chats.list_active(owner))
        refusal = svc.access.creation_refused(owner, active, now)
        if refusal is not None:
            log.info(
                "command.refused", room_id=update.room_id, command="new", owner=owner, why=refusal
            )
            await _say(update, data, refusal)
            return
        svc.access.record_creation(owner, now)
        if shared:
            await svc.store.set_creations(owner, svc.access.creations(owner))
        room_id, chat = await create_chat(svc, owner, user.space_id, title, update.event_id)
    link = matrix_to(room_id, svc.hs.server_name)
    if await svc.store.get_encrypted(room_id) is not None:  # made, but the bot cannot read it
        told = CHAT_ENCRYPTED.format(title=chat.title, chat_link=link)
        await _say(update, data, f"{told}\n{admin_can_fix(_in_lobby(data))}")
        return
    await _say(
        update,
        data,
        f"Created “{chat.title}”: {link}",
        f'Created <a href="{link}">{html.escape(chat.title)}</a>.',
    )


async def cmd_rename(cmd: Command, update: Update, data: EventData) -> None:
    svc, route, chat = _chat_context(data)
    try:
        title = validate_title(cmd.args)
    except InvalidTitle as err:
        await _say(update, data, f"{err} Usage: {cmd.spec.usage}")
        return
    # The homeserver first, the local cache after it succeeded (write-through).
    await svc.hs.set_name(route.room_id, title)
    await svc.hs.set_chat_marker(route.room_id, route.owner, chat.chat_id, chat.status)
    await svc.chats.rename(route.owner, chat.chat_id, title)
    await _say(update, data, f"Renamed to “{title}”.")


async def cmd_archive(cmd: Command, update: Update, data: EventData) -> None:
    svc, route, chat = _chat_context(data)
    if chat.status == "archived":
        await _say(update, data, "This chat is already archived. Send !new to start another.")
        return
    await svc.store.set_pending(
        route.room_id, Pending("archive", chat.chat_id, time.time() + CONFIRM_TTL_S)
    )
    await _say(
        update,
        data,
        f"Archive “{chat.title}”? Send !confirm within 5 minutes, or !cancel to keep it.",
    )


async def cmd_confirm(cmd: Command, update: Update, data: EventData) -> None:
    svc, route, chat = _chat_context(data)
    pending = await svc.store.get_pending(update.room_id)
    if pending is None:
        await _say(
            update,
            data,
            "There is nothing to confirm here. (Confirmations are kept "
            "locally, so a restart with a reset database clears them.) "
            "Send !archive again if you meant to archive this chat.",
        )
        return
    if pending.expired or pending.chat_id != chat.chat_id:
        await svc.store.set_pending(update.room_id, None)
        await _say(update, data, "That confirmation has expired. Send !archive again.")
        return
    # The homeserver first, the local cache after it succeeded (write-through); a failure
    # keeps the confirmation pending, so !confirm can simply be sent again.
    await svc.hs.set_chat_marker(route.room_id, route.owner, chat.chat_id, "archived")
    if route.meta.space_id:
        await svc.hs.unlink_child(route.meta.space_id, route.room_id)
    chat = await svc.chats.archive(route.owner, chat.chat_id)
    await svc.store.set_pending(update.room_id, None)
    log.info("chat.archived", room_id=route.room_id, chat_id=chat.chat_id, owner=route.owner)
    await _say(update, data, f"Archived “{chat.title}”. Send !new to start a new chat.")


async def cmd_cancel(cmd: Command, update: Update, data: EventData) -> None:
    svc = data["services"]
    if await svc.store.get_pending(update.room_id) is None:
        await _say(update, data, "There is nothing to cancel here.")
        return
    await svc.store.set_pending(update.room_id, None)
    await _say(update, data, "Cancelled. The chat stays as it is.")


async def cmd_chats(cmd: Command, update: Update, data: EventData) -> None:
    svc, owner = data["services"], update.sender
    if data.get("user") is None:
        await _say(update, data, NO_SPACE)
        return
    rooms = await svc.store.chat_rooms_of(owner)
    chats = [c for c in await svc.chats.list_all(owner) if c.chat_id in rooms]
    active = [c for c in chats if c.status == "active"]
    archived = len(chats) - len(active)
    if not active:
        await _say(
            update, data, f"You have no active chats ({archived} archived). Send !new to start one."
        )
        return
    plain, items = [], []
    for chat in active:
        link = matrix_to(rooms[chat.chat_id], svc.hs.server_name)
        here = rooms[chat.chat_id] == update.room_id
        plain.append(f"• {chat.title} — {link}{' (this chat)' if here else ''}")
        items.append(
            f'<li><a href="{link}">{html.escape(chat.title)}</a>'
            f"{' <b>(this chat)</b>' if here else ''}</li>"
        )
    footer = f"{archived} archived."
    await _say(
        update,
        data,
        "Your chats:\n" + "\n".join(plain) + "\n" + footer,
        f"<p>Your chats:</p><ul>{''.join(items)}</ul><p>{footer}</p>",
    )


# What each command of the table (``adapter.matrix.chain.command_table``) runs.
RUNS: dict[str, Run] = {
    "new": cmd_new,
    "chats": cmd_chats,
    "rename": cmd_rename,
    "archive": cmd_archive,
    "confirm": cmd_confirm,
    "cancel": cmd_cancel,
    "help": cmd_help,
    UNKNOWN.name: cmd_unknown,
}


async def handle_command(update: Update, data: EventData) -> None:
    cmd = data["command"]
    if cmd is None:
        return
    log.info("command.received", room_id=update.room_id, command=cmd.name, sender=update.sender)
    data["services"].metrics.commands.labels(command=cmd.spec.name).inc()  # bounded: the table
    if not cmd.spec.in_lobby and not isinstance(data["route"], ChatRoute):
        await _say(update, data, f"!{cmd.name} works in a chat room. Send it there.")
        return
    await RUNS[cmd.spec.name](cmd, update, data)
