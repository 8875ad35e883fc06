"""tools/reset_local.py against a real bot and homeserver (SPEC §7)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nio import AsyncClient, WhoamiError

from tests.integration.conftest import reset_tool


async def reset(bot, *args: str, stdin: bytes = b"") -> tuple[int, str]:
    return await reset_tool(bot.config, *args, stdin=stdin)


def snapshot(paths: list[Path]) -> dict[str, bytes]:
    files = {}
    for base in paths:
        for path in ([base] if base.is_file() else base.rglob("*") if base.exists() else []):
            if path.is_file():
                files[str(path)] = path.read_bytes()
    return files


async def test_refuses_while_the_bot_runs_and_touches_nothing(bot, make_user):
    alice = await make_user("alice")
    await alice.onboard(bot.user_id)
    before = snapshot([bot.config.store_path])
    code, out = await reset(bot, "--yes")
    assert code == 1 and "Stop it first" in out and f"kill -TERM {os.getpid()}" in out
    assert bot.config.db_path.exists() and snapshot([bot.config.store_path]) == before


async def test_dry_run_prints_the_plan_and_changes_nothing(bot, make_user):
    alice = await make_user("alice")
    _, space, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    before = snapshot([bot.config.db_path.parent])
    code, out = await reset(bot, "--dry-run")
    assert code == 0 and "Dry run: nothing was changed." in out
    assert space in out and chat in out and "Chat 1" in out and alice.user_id in out
    assert "matrix_room" in out and "leave these in your Matrix client" in out
    after = snapshot([bot.config.db_path.parent])
    assert {k: v for k, v in after.items() if not k.endswith(".lock")} == \
        {k: v for k, v in before.items() if not k.endswith(".lock")}


async def test_reset_then_restart_heals_with_cause_local_reset_and_twice_in_a_row(bot, make_user):
    alice = await make_user("alice")
    _, _, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    code, out = await reset(bot, "--yes")
    assert code == 0 and "cause=local_reset" in out
    assert not bot.config.store_path.exists()
    code, _ = await reset(bot, "--yes")
    assert code == 0
    await bot.start()
    await alice.ask(chat, bot.user_id, "after reset", "Echo: after reset")
    healed = bot.logs.named("state.healed", room_id=chat)
    assert healed and healed[0]["cause"] == "local_reset"


async def test_backup_moves_files_into_a_timestamped_folder(bot, tmp_path):
    await bot.stop()
    code, out = await reset(bot, "--yes", "--backup", str(tmp_path / "bk"))
    assert code == 0
    [folder] = list((tmp_path / "bk").iterdir())
    assert (folder / bot.config.db_path.name).exists()
    assert (folder / bot.config.store_path.name / "session.json").exists()


async def test_without_yes_a_no_answer_changes_nothing(bot):
    await bot.stop()
    code, out = await reset(bot, stdin=b"n\n")
    assert code == 1 and "Nothing changed." in out
    assert (bot.config.store_path / "session.json").exists()


async def test_server_mode_empties_bot_rooms_and_logs_out_the_device(bot, make_user):
    alice = await make_user("alice")
    lobby, space, chat = await alice.onboard(bot.user_id)
    await bot.stop()
    session = json.loads((bot.config.store_path / "session.json").read_text())
    code, out = await reset(bot, "--server", "--yes")
    assert code == 0, out
    assert "logged out device" in out and f"{lobby}: not created by the bot" in out
    for room_id in (space, chat):
        assert f"{room_id}: kick {alice.user_id}, leave, forget" in out
    await alice.sync()
    members = await alice.client.joined_members(chat)
    assert alice.user_id not in [m.user_id for m in getattr(members, "members", [])]
    old = AsyncClient(bot.config.homeserver, bot.config.user_id)
    old.restore_login(bot.config.user_id, session["device_id"], session["access_token"])
    assert isinstance(await old.whoami(), WhoamiError)
    await old.close()
    bot_client = AsyncClient(bot.config.homeserver, bot.config.user_id)
    await bot_client.login(bot.config.password)
    try:
        rooms = (await bot_client.joined_rooms()).rooms
        assert space not in rooms and chat not in rooms and lobby in rooms
    finally:
        await bot_client.close()
