"""Invite bootstrap after a crash or a total local loss: never a second Space (SPEC §5, §6)."""

from __future__ import annotations

from urllib.parse import quote

from nio import AsyncClient

from adapter.matrix.chain.access import Access
from adapter.matrix.chain.context import Services
from adapter.matrix.chain.router import RoomRouter
from adapter.matrix.conversation.history import Conversations
from adapter.matrix.handlers.chat_rooms import create_chat, linked_rooms
from adapter.matrix.homeserver.client import Homeserver
from adapter.matrix.store.records import MatrixStore
from core.agent import EchoAgent
from core.chat import ChatManager
from core.store import SQLiteStore


async def test_invite_after_total_loss_reuses_space_and_first_chat(bot, make_user):
    alice = await make_user("alice")
    _, space, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    await bot.lose("everything")
    rooms_before = await bot.server_room_count()
    await bot.start()
    second_lobby = await alice.open_lobby(bot.user_id)
    welcome = await alice.wait_reply(second_lobby, bot.user_id, "Welcome back")
    assert linked_rooms(welcome["content"]["body"]) == [space, chat]
    assert await bot.server_room_count() == rooms_before + 1  # only the new lobby was joined
    assert len(bot.logs.named("space.created")) == 1  # the first onboarding's, no other


async def test_a_new_users_invite_after_a_total_loss_reads_no_other_users_room(
    proxied_bot, proxy, make_user
):
    """Bob has no Space, and his new Space has no chat to adopt: knowing it reads no state
    of Alice's rooms (after a total loss the DB knows none of them: at scale, all rooms)."""
    alice, bob = await make_user("alice"), await make_user("bob")
    alice_rooms = await alice.onboard(proxied_bot.user_id)
    await proxied_bot.restart_losing("everything")
    mark = len(proxy.requests)
    await bob.onboard(proxied_bot.user_id)
    states = [path for path in proxy.requests[mark:] if "/state" in path]
    assert not [
        path
        for path in states
        for room in alice_rooms
        if room in path or quote(room, safe="") in path
    ]


async def test_crash_after_creating_the_space_ends_with_one_space_and_one_first_chat(
    bot, make_user
):
    alice = await make_user("alice")
    await bot.stop()
    # The crash: the Space exists on the server (marker, Alice invited), nothing else does.
    client = AsyncClient(bot.config.homeserver, bot.config.user_id)
    await client.login(bot.config.password)
    orphan_space = await Homeserver(client, "localhost").create_space(alice.user_id)
    await client.logout()
    await client.close()
    await bot.lose("everything")
    await bot.start()

    lobby = await alice.open_lobby(bot.user_id)
    welcome = await alice.wait_reply(lobby, bot.user_id, "Welcome! Your Space")
    assert linked_rooms(welcome["content"]["body"])[0] == orphan_space
    assert not bot.logs.named("space.created")
    assert len(bot.logs.named("chat.created")) == 1
    await bot.restart()
    again = await alice.open_lobby(bot.user_id)
    await alice.wait_reply(again, bot.user_id, "Welcome back")
    assert len(bot.logs.named("chat.created")) == 1 and not bot.logs.named("space.created")


async def test_replayed_new_command_creates_its_room_once(bot, make_user):
    """A round replayed after a crash runs ``!new`` again: the same room comes back."""
    alice = await make_user("alice")
    _, space, _ = await alice.onboard(bot.user_id)
    await bot.stop()
    client = AsyncClient(bot.config.homeserver, bot.config.user_id)
    await client.login(bot.config.password)
    store = await SQLiteStore.open(bot.config.db_path)
    try:
        mstore = MatrixStore(store)
        hs = Homeserver(client, "localhost")
        svc = Services(
            hs=hs,
            store=mstore,
            chats=ChatManager(store),
            agent=EchoAgent(),
            router=RoomRouter(mstore),
            access=Access(("@*:localhost",), max_chats=100),
            conversation=Conversations(hs, 20),
        )
        rooms_before = len((await client.joined_rooms()).rooms)
        first = await create_chat(svc, alice.user_id, space, "Replayed", "$source-event")
        again = await create_chat(svc, alice.user_id, space, "Replayed", "$source-event")
        assert first == again
        assert len((await client.joined_rooms()).rooms) == rooms_before + 1
    finally:
        await store.close()
        await client.logout()
        await client.close()
