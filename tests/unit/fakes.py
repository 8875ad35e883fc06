"""Fakes for unit tests of the chain and the handlers: a homeserver that records its calls,
and ``Services`` over it with the real stores on the test's SQLite file."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from adapter.matrix.chain.access import Access
from adapter.matrix.chain.command_table import parse_command
from adapter.matrix.chain.context import EventData, Services
from adapter.matrix.chain.router import ChatRoute, RoomRouter
from adapter.matrix.conversation.history import Conversations
from adapter.matrix.ingest.update import Update, UpdateKind
from adapter.matrix.store.records import MatrixStore, RoomMeta, UserMeta
from adapter.matrix.vocabulary.content import SOURCE_KEY
from core.agent import EchoAgent
from core.chat import Chat, ChatManager
from core.store import SQLiteStore

BOT, ALICE, MALLORY = "@lambda:x", "@alice:x", "@mallory:x"
SPACE, LOBBY, CHAT = "!space:x", "!lobby:x", "!chat1:x"


@dataclass(frozen=True)
class Sent:
    room_id: str
    body: str
    html: str | None
    notice: bool
    txn_id: str | None
    source_event_id: str | None
    content: dict = field(default_factory=dict, compare=False)


class FakeHomeserver:
    """Records every call but sends in ``calls`` and sends in ``sent``. ``fail[name] = error``
    makes that method raise."""

    bot_id = BOT
    server_name = "x"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.sent: list[Sent] = []
        self.fail: dict[str, Exception] = {}
        self._room_numbers = itertools.count(1)
        self.encrypts = False  # rooms it creates come back encrypted (get_state shows it)
        self.encrypted: set[str] = set()
        self.made_at: dict[str, int] = {}  # room id -> its creation, ms

    def _call(self, name: str, *args: object) -> None:
        if name in self.fail:
            raise self.fail[name]
        self.calls.append((name, *args))

    @property
    def bodies(self) -> list[str]:
        return [sent.body for sent in self.sent]

    async def send(self, room_id: str, content: dict, txn_id: str | None = None) -> str:
        if "send" in self.fail:
            raise self.fail["send"]
        self.sent.append(
            Sent(
                room_id,
                content["body"],
                content.get("formatted_body"),
                content["msgtype"] == "m.notice",
                txn_id,
                content.get(SOURCE_KEY),
                content,
            )
        )
        return f"$sent{len(self.sent)}"

    async def messages(
        self, room_id: str, start: str | None, end: str | None, limit: int, types: list[str]
    ) -> tuple[list[dict], str | None]:
        self._call("messages", room_id)
        return [], None

    async def messages_after(
        self, room_id: str, event_id: str, limit: int, senders: list[str]
    ) -> tuple[list[dict], str | None]:
        self._call("messages_after", room_id, event_id)
        return [
            {
                "type": "m.room.message",
                "sender": self.bot_id,
                "content": sent.content,
                "event_id": f"$sent{i}",
            }
            for i, sent in enumerate(self.sent, 1)
            if sent.room_id == room_id
        ], None

    async def join(self, room_id: str) -> None:
        self._call("join", room_id)

    async def leave(self, room_id: str) -> None:
        self._call("leave", room_id)

    async def invite(self, room_id: str, user_id: str) -> None:
        self._call("invite", room_id, user_id)

    async def set_name(self, room_id: str, name: str) -> None:
        self._call("set_name", room_id, name)

    async def set_chat_marker(self, room_id: str, owner: str, chat_id: str, status: str) -> None:
        self._call("set_chat_marker", room_id, owner, chat_id, status)

    async def joined_rooms(self) -> list[str]:
        return list(self.made_at)

    async def create_space(self, owner: str) -> str:
        self._call("create_space", owner)
        return self._made(f"!space{next(self._room_numbers)}:x")

    def _made(self, room_id: str) -> str:
        self.made_at[room_id] = int(time.time() * 1000)
        if self.encrypts:
            self.encrypted.add(room_id)
        return room_id

    async def create_chat_room(self, owner: str, space_id: str, chat_id: str, title: str) -> str:
        self._call("create_chat_room", owner, space_id, chat_id, title)
        return self._made(f"!room{next(self._room_numbers)}:x")

    async def get_state(self, room_id: str) -> list[dict]:
        """A room it made: its create event, and its encryption if it encrypts. Not recorded
        in ``calls``: the bot only reads it."""
        if "get_state" in self.fail:
            raise self.fail["get_state"]
        events = [
            {
                "type": "m.room.create",
                "state_key": "",
                "sender": self.bot_id,
                "content": {"room_version": "12"},
                "origin_server_ts": self.made_at.get(room_id, 1_700_000_000_000),
            }
        ]
        if room_id in self.encrypted:
            events.append(
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "sender": self.bot_id,
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            )
        return events

    async def link_child(self, space_id: str, room_id: str) -> None:
        self._call("link_child", space_id, room_id)

    async def unlink_child(self, space_id: str, room_id: str) -> None:
        self._call("unlink_child", space_id, room_id)

    async def typing(self, room_id: str, on: bool, timeout_ms: int = 30_000) -> None:
        pass


def make_services(
    store: SQLiteStore, hs: FakeHomeserver | None = None, access: Access | None = None
) -> Services:
    matrix, hs = MatrixStore(store), hs or FakeHomeserver()
    return Services(
        hs=hs,  # type: ignore[arg-type]  # a duck-typed fake of Homeserver
        store=matrix,
        chats=ChatManager(store),
        agent=EchoAgent(),
        router=RoomRouter(matrix),
        access=access or Access(("@*:x",), max_chats=100),
        conversation=Conversations(hs, 20),  # type: ignore[arg-type]  # the same fake
    )


async def onboard(svc: Services, owner: str = ALICE) -> Chat:
    """What a finished onboarding leaves in the DB: a Space, a lobby, and "Chat 1" in CHAT."""
    await svc.store.set_user(owner, UserMeta(SPACE, LOBBY))
    await svc.store.set_room(SPACE, RoomMeta("space", owner))
    await svc.store.set_room(LOBBY, RoomMeta("lobby", owner))
    chat = await svc.chats.get_or_create(owner, "c1", "Chat 1")
    await svc.store.set_room(CHAT, RoomMeta("chat", owner, chat.chat_id, SPACE))
    return chat


def message(
    room_id: str,
    body: str,
    sender: str = ALICE,
    event_id: str = "$ev",
    *,
    kind: UpdateKind = "message",
    catchup: bool = False,
    attempt: int = 0,
) -> Update:
    return Update(
        kind,
        room_id,
        sender,
        event_id,
        body,
        catchup=catchup,
        attempt=attempt,
    )


async def healed_data(svc: Services, update: Update) -> EventData:
    """The data the chain gives a handler when every record is there (nothing to heal)."""
    route = await svc.router.resolve(update.room_id)
    chat = None
    if isinstance(route, ChatRoute):
        chat = await svc.chats.get(route.owner, route.meta.chat_id or "")
    return EventData(
        services=svc,
        route=route,
        chat=chat,
        command=parse_command(update.body) if update.is_command else None,
        user=await svc.store.get_user(update.sender),
    )
