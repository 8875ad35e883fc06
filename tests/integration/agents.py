"""Agents for the delivery tests, loaded through LAMBDA_AGENT like a real one would be."""

from __future__ import annotations

import asyncio
import os

import structlog

from core.chat import Chat

log = structlog.get_logger()


class SlowAgent:
    """Thinks for TEST_AGENT_DELAY_S seconds (a real LLM takes seconds), then echoes."""

    async def reply(self, chat: Chat, text: str) -> str:
        log.info("test_agent.thinking", text=text)
        await asyncio.sleep(float(os.environ.get("TEST_AGENT_DELAY_S", "5")))
        return f"Echo: {text}"


class GatedAgent:
    """Holds every text starting with "slow" until ``release`` is set; echoes the rest."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding: list[str] = []

    async def reply(self, chat: Chat, text: str) -> str:
        if text.startswith("slow"):
            self.holding.append(text)
            await self.release.wait()
        return f"Echo: {text}"


class FaultyAgent:
    """Raises on "boom", never answers "hang" (its timeout is half a second), else echoes."""

    timeout_s = 0.5

    async def reply(self, chat: Chat, text: str) -> str:
        if text == "boom":
            raise RuntimeError("the model is on fire")
        if text == "hang":
            await asyncio.Event().wait()
        return f"Echo: {text}"
