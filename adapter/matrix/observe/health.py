"""What ``/health`` answers (SPEC §9): a small state that the sync loop and the store-fault
paths update, judged against a clock only when asked. Pure: no I/O, an injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

OUTAGE_AFTER_S = 30.0
LONG_POLL_S = 30.0  # the sync loop's long poll: a round at least this often, events or not
Reason = Literal["not_syncing_yet", "homeserver_failing", "store_refuses_writes"]


@dataclass(frozen=True)
class Problem:
    reason: Reason
    detail: str


@dataclass(frozen=True)
class HealthReport:
    problems: tuple[Problem, ...]
    last_sync_s: float | None  # since the last sync round the DB recorded; None: none yet

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        body: dict = {
            "status": "ok" if self.ok else "unavailable",
            "last_sync_s": None if self.last_sync_s is None else round(self.last_sync_s, 1),
        }
        if self.problems:
            body["problems"] = [{"reason": p.reason, "detail": p.detail} for p in self.problems]
        return body


class Health:
    """The bot is healthy while it syncs: a round was recorded, the homeserver has not been
    failing for more than ``outage_after_s``, and the DB takes writes."""

    def __init__(
        self, outage_after_s: float = OUTAGE_AFTER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.outage_after_s = outage_after_s
        self._clock = clock
        self._synced_at: float | None = None
        self._failing_since: float | None = None
        self._homeserver_error = ""
        self._store_error: str | None = None
        self._pushed = False  # appservice mode: events are pushed, no sync round is awaited

    @property
    def store_refusing(self) -> bool:
        return self._store_error is not None

    def homeserver_answered(self) -> None:
        self._failing_since = None

    def homeserver_failed(self, error: str) -> None:
        """A request failed (unreachable, 5xx): an outage starts now unless one is going on."""
        if self._failing_since is None:
            self._failing_since = self._clock()
        self._homeserver_error = error

    def store_refused(self, error: str) -> None:
        """The DB refused a write (``store.write_failed``)."""
        self._store_error = error

    def listening(self) -> None:
        """Appservice mode: the listener is up. The bot is ready, and an idle homeserver pushing
        nothing is no outage."""
        self._pushed = True
        self.synced()

    def standing_by(self) -> None:
        """A replica that does not sync (another one does, SPEC §10) reached the DB: its part
        of the work goes on."""
        self._synced_at = self._clock()
        self._store_error = None

    def synced(self) -> None:
        """A sync round was recorded: the homeserver answers and the DB takes writes again."""
        self._synced_at = self._clock()
        self._failing_since = None
        self._store_error = None

    def report(self) -> HealthReport:
        now, problems = self._clock(), []
        if self._synced_at is None:
            problems.append(Problem("not_syncing_yet", "the bot has not recorded a sync round yet"))
        if self._failing_since is not None and now - self._failing_since > self.outage_after_s:
            problems.append(
                Problem(
                    "homeserver_failing",
                    f"the homeserver has been failing for "
                    f"{now - self._failing_since:.0f} s: {self._homeserver_error}",
                )
            )
        elif (
            self._synced_at is not None
            and not self._pushed
            and now - self._synced_at > self.outage_after_s + LONG_POLL_S
        ):
            # A homeserver that hangs fails no request for minutes (nio's own timeouts).
            problems.append(
                Problem(
                    "homeserver_failing",
                    f"no sync round for {now - self._synced_at:.0f} s: "
                    "the homeserver does not answer",
                )
            )
        if self._store_error is not None:
            problems.append(
                Problem("store_refuses_writes", f"the local DB refuses writes: {self._store_error}")
            )
        return HealthReport(
            tuple(problems), None if self._synced_at is None else now - self._synced_at
        )
