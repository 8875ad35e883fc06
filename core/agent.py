"""The assistant behind a chat. The real Lambda SDK plugs in behind ``Agent``, chosen with
``LAMBDA_AGENT=module:factory`` (an import string, in the style of uvicorn's ``app``)."""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from core.chat import Chat

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Turn:
    """One earlier turn of a chat: the owner's message (as last edited) or the answer to it."""

    role: Literal["user", "assistant"]
    text: str
    event_id: str
    ts: int  # origin_server_ts, ms


class PlainAgent(Protocol):
    """An agent may also set ``timeout_s``: how long one answer may take (default 300 s), and
    take a keyword ``history`` (``list[Turn]``, oldest first) to see the conversation."""

    async def reply(self, chat: Chat, text: str) -> str:
        """The assistant's answer to ``text`` in ``chat``, in Markdown."""
        ...


class HistoryAgent(Protocol):
    """An agent whose ``reply`` requires the ``history`` (see ``wants_history``)."""

    async def reply(self, chat: Chat, text: str, *, history: list[Turn]) -> str: ...


Agent = PlainAgent | HistoryAgent


class AgentLoadError(Exception):
    """``LAMBDA_AGENT`` names nothing that can be imported and called; the message says why."""


class EchoAgent:
    """Deterministic stand-in: the answer contains the user's text verbatim."""

    async def reply(self, chat: Chat, text: str) -> str:
        return f"Echo: {text}"


def agent_timeout(agent: Agent) -> float:
    return float(getattr(agent, "timeout_s", DEFAULT_TIMEOUT_S))


def wants_history(agent: Agent) -> bool:
    """Whether ``agent.reply`` takes the keyword ``history`` (or any keyword)."""
    try:
        params = inspect.signature(agent.reply).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: call it the old way
        return False
    return any(
        p.kind is p.VAR_KEYWORD
        or (p.name == "history" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        for p in params
    )


def load_agent(import_string: str) -> Agent:
    """``"module.path:factory"`` -> ``factory()``, imported with the repository root on the path."""
    module_name, _, attr = import_string.partition(":")
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AgentLoadError(
            f"LAMBDA_AGENT={import_string!r}: cannot import {module_name!r} ({err})"
        ) from err
    factory: object = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise AgentLoadError(
                f"LAMBDA_AGENT={import_string!r}: {module_name!r} has no attribute {attr!r}"
            )
    if not callable(factory):
        raise AgentLoadError(f"LAMBDA_AGENT={import_string!r}: {attr!r} is not callable")
    agent = factory()
    if not callable(getattr(agent, "reply", None)):
        raise AgentLoadError(
            f"LAMBDA_AGENT={import_string!r}: the object {attr}() returned "
            "has no reply(chat, text) method"
        )
    return agent
