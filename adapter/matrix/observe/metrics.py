"""The bot's Prometheus metrics, in one registry per bot (not the global one), so that several
bots in one process (the in-process tests) count apart. Recording is a counter or histogram
update, about a microsecond: nothing next to a homeserver round trip."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

T = TypeVar("T")
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"  # what every Prometheus reads
# An LLM answers in a fraction of a second to a couple of minutes.
LLM_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)


class Metrics:
    """Every ``lambda_*`` metric of one bot. Reached from ``Services.metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LLM_BUCKETS, registry=self.registry)

        self.messages_answered = counter(
            "lambda_messages_answered", "Messages whose answer from the agent was sent."
        )
        self.commands = counter(
            "lambda_commands",
            "Commands received, by name (unknown: not a command of !help).",
            "command",
        )
        self.reply_latency = histogram(
            "lambda_reply_latency_seconds",
            "From a message's origin_server_ts to its answer being sent (catch-up included).",
        )
        self.agent_call = histogram(
            "lambda_agent_call_duration_seconds", "Agent calls, failed and timed-out ones included."
        )
        self.heals = counter(
            "lambda_heals",
            "Rooms whose records were healed (state.healed), by cause and source.",
            "cause",
            "source",
        )
        self.heal_refusals = counter(
            "lambda_heal_refusals", "Rooms the bot refused to heal (state.heal_refused).", "reason"
        )
        self.encrypted_rooms = counter(
            "lambda_encrypted_rooms",
            "Rooms the bot made that the homeserver encrypted, so it cannot read them, by kind "
            "(room.encrypted_by_server: each once, when the DB first records it).",
            "kind",
        )
        self.inbox_depth = Gauge(
            "lambda_inbox_depth",
            "Updates in the inbox, not yet fully handled.",
            registry=self.registry,
        )
        self.retries_scheduled = counter(
            "lambda_retries_scheduled",
            "Updates postponed for another attempt (delivery.retry_scheduled).",
        )
        self.updates_given_up = counter(
            "lambda_updates_given_up",
            "Updates dropped after their last attempt (delivery.gave_up).",
        )
        self.sync_rounds = counter("lambda_sync_rounds", "Sync requests the homeserver answered.")
        self.sync_failures = counter(
            "lambda_sync_failures", "Sync requests that failed (sync.failed)."
        )
        self.session_renewals = counter(
            "lambda_session_renewals", "Password logins after a revoked token (session.relogin)."
        )

    def answered(self, origin_server_ts_ms: int) -> None:
        """A message's answer was sent: count it, and how long its sender waited."""
        self.messages_answered.inc()
        if origin_server_ts_ms > 0:
            self.reply_latency.observe(max(0.0, time.time() - origin_server_ts_ms / 1000))

    async def timed_agent_call(self, call: Awaitable[T]) -> T:
        """Await the agent's call and time it, however it ends (a timeout cancels it here)."""
        started = time.perf_counter()
        try:
            return await call
        finally:
            self.agent_call.observe(time.perf_counter() - started)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (``TEXT_FORMAT``)."""
        return generate_latest(self.registry)
