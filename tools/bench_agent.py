"""The benchmarks' agent in a bot process: ``LAMBDA_AGENT=bench_agent:SlowAgent`` with tools/ on
``PYTHONPATH``. It thinks for ``BENCH_AGENT_DELAY_S`` (1 s), echoes, and logs when each call
began and ended (epoch ms), so that a benchmark can split a latency into bot and agent time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from core.chat import Chat

log = structlog.get_logger()
DELAY_S = float(os.environ.get("BENCH_AGENT_DELAY_S", "1.0"))


class SlowAgent:
    async def reply(self, chat: Chat, text: str) -> str:
        began = time.time() * 1000
        await asyncio.sleep(DELAY_S)
        log.info("bench_agent.replied", text=text, began=began, ended=time.time() * 1000)
        return f"Echo: {text}"


class LoggedCalls:
    """``SlowAgent``'s calls as a bot process logged them: ``calls[text] = (began, ended)``,
    the shape ``bench_delivery.burst`` reads."""

    def __init__(self, logs: Sequence[Mapping[str, Any]]) -> None:
        self.logs = logs

    @property
    def calls(self) -> dict[str, tuple[float, float]]:
        return {
            e["text"]: (e["began"], e["ended"])
            for e in self.logs
            if e.get("event") == "bench_agent.replied"
        }
