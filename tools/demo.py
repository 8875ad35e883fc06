"""Scripted demo (`make demo`): a user invites the bot, chats, the developer resets the
local state with tools/reset_local.py, and the next message heals the room lazily.

Everything runs on a throw-away local Synapse; the bot is the real `python -m adapter.matrix`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from sandbox import bot_config, throwaway_homeserver  # noqa: E402
from scripted_user import ScriptedUser  # noqa: E402

from adapter.matrix.handlers.chat_rooms import linked_rooms  # noqa: E402

SHOWN = {
    "bot.ready",
    "space.created",
    "chat.created",
    "state.healed",
    "state.heal_refused",
    "state.heal_failed",
    "sync.catchup",
    "sync.gap_backfilled",
    "bot.stopped",
}


class Bot:
    def __init__(self, env: dict[str, str]) -> None:
        self.env, self.ready = env, asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.warnings: list[dict] = []  # a healthy run has none (SPEC §6)

    async def start(self) -> None:
        self.ready.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "adapter.matrix",
            cwd=ROOT,
            env=self.env,
            stderr=asyncio.subprocess.PIPE,
        )
        asyncio.create_task(self._echo_logs(self.proc))
        await asyncio.wait_for(self.ready.wait(), 60)

    async def _echo_logs(self, proc) -> None:
        async for raw in proc.stderr:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("level") in ("warning", "error", "critical"):
                self.warnings.append(line)
            if line.get("event") in SHOWN:
                fields = {k: v for k, v in line.items() if k not in ("event", "timestamp")}
                print(f"    [bot log] {line['event']} {json.dumps(fields)}")
            if line.get("event") == "bot.ready":
                self.ready.set()

    async def stop(self) -> None:
        assert self.proc is not None, "stop() before start()"
        self.proc.send_signal(signal.SIGTERM)
        await self.proc.wait()


def step(text: str) -> None:
    print(f"\n== {text}")


async def demo() -> None:
    with throwaway_homeserver("lambda-demo-") as (hs, work):
        config = bot_config(hs, work, "lambda")
        alice = hs.register("alice", "alice-demo-pw")
        env = {**os.environ, **config.to_env()}
        bot = Bot(env)
        step(f"Start the bot on {hs.url}")
        await bot.start()
        user = await ScriptedUser.log_in(hs.url, alice.user_id, alice.password, config.user_id)
        step(f"{alice.user_id} invites the bot")
        lobby = await user.invite_bot()
        welcome = await user.wait_for_bot(lobby, "Welcome")
        print(f"    bot: {welcome}")
        chat = linked_rooms(welcome)[1]
        for body, expect in [("Hello Lambda!", "Echo"), ("!rename Demo chat", "Renamed")]:
            _, text = await user.ask(chat, body, expect)
            print(f"    alice: {body}\n    bot: {text}")

        step("Stop the bot and reset the local state (tools/reset_local.py --yes)")
        await bot.stop()
        reset = await asyncio.create_subprocess_exec(
            sys.executable,
            "tools/reset_local.py",
            "--yes",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await reset.communicate()
        print("    " + out.decode().strip().replace("\n", "\n    "))

        step("Start the bot again: startup does nothing extra")
        await bot.start()
        step("The next message heals its room lazily (see state.healed, cause=local_reset)")
        for room, body, expect in [
            (chat, "Are you still there?", "Echo"),
            (lobby, "!chats", "Your chats"),
        ]:
            _, text = await user.ask(room, body, expect)
            print(f"    alice: {body}\n    bot: {text}")
        await bot.stop()
        await user.close()
        if bot.warnings:
            step(f"FAILED: this healthy run logged {len(bot.warnings)} warnings:")
            for line in bot.warnings:
                print(f"    {json.dumps(line)}")
            raise SystemExit(1)
        step("Done: no room was re-created, nobody left anything, and no warning was logged.")


if __name__ == "__main__":
    asyncio.run(demo())
