"""The sync filter asks only for what the bot uses (SPEC §7, Scale): other users typing and
reading in the bot's rooms do not end its long poll. Counted on the wire, by the proxy."""

from __future__ import annotations

SYNC = r"/_matrix/client/v3/sync$"


async def test_users_typing_and_reading_in_their_rooms_cost_the_bot_no_sync(
    proxied_bot, proxy, make_user
):
    bot = proxied_bot
    typists = [await make_user("typist") for _ in range(3)]
    chats = [(await user.onboard(bot.user_id))[2] for user in typists]
    # Everything before this answer has reached the bot; its own echo ends one more long poll.
    echo = await typists[-1].ask(chats[-1], bot.user_id, "settled?", "Echo: settled?")
    before = proxy.count(SYNC)
    await typists[-1].client.update_receipt_marker(chats[-1], echo["event_id"])
    for on in (True, False, True, False):
        for user, chat in zip(typists, chats, strict=False):
            await user.client.room_typing(chat, on, 30_000)
            # Seen in the typist's own sync: every long poll in the room was woken by then.
            await user.wait_for(
                lambda u=user, c=chat, on=on: (u.user_id in u.typing.get(c, [])) == on
            )
    assert proxy.count(SYNC) - before <= 1  # at most the long poll after the bot's own echo
