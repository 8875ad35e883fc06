"""The assistant behind a chat. The real Lambda SDK plugs in behind ``Agent``."""

from __future__ import annotations

from typing import Protocol

from core.chat import Chat


class Agent(Protocol):
    async def reply(self, chat: Chat, text: str) -> str:
        """The assistant's answer to ``text`` in ``chat``."""
        ...


class EchoAgent:
    """Deterministic stand-in: the answer contains the user's text verbatim."""

    async def reply(self, chat: Chat, text: str) -> str:
        return f"Echo: {text}"
