"""Agents for the delivery tests, loaded through LAMBDA_AGENT like a real one would be."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

from core.agent import Turn
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


class RecordingAgent:
    """Takes the conversation; remembers what each call was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Turn]]] = []

    async def reply(self, chat: Chat, text: str, history: list[Turn]) -> str:
        self.calls.append((text, history))
        return f"Echo: {text}"

    def history_of(self, text: str) -> list[tuple[str, str]]:
        """(role, text) of the history the last call for ``text`` was given."""
        history = next(h for t, h in reversed(self.calls) if t == text)
        return [(turn.role, turn.text) for turn in history]


class MarkdownAgent:
    """An agent of the old style (no history) that answers in Markdown, hostile bits too."""

    async def reply(self, chat: Chat, text: str) -> str:
        return (
            f'**Echo:** {text}\n\n<script>alert(1)</script> <b onmouseover="x()">raw</b>\n\n'
            "[click](javascript:alert(1))\n\n```python\nprint('hi')\n```"
        )


class CountingAgent:
    """Appends each text it is asked to TEST_AGENT_CALLS (a file), across processes."""

    async def reply(self, chat: Chat, text: str, history: list[Turn]) -> str:
        with Path(os.environ["TEST_AGENT_CALLS"]).open("a") as calls:
            calls.write(text + "\n")
        return f"Echo: {text}"


class HistoryAgent:
    """Echoes the text and the history it was given, so a test in another process reads it."""

    async def reply(self, chat: Chat, text: str, history: list[Turn]) -> str:
        return f"Echo: {text} | " + "; ".join(f"{turn.role}: {turn.text}" for turn in history)
