"""What one examination found, and its verdict: the DB's birth, its inbox, and a finding per
room (SPEC §9)."""

from __future__ import annotations

from dataclasses import dataclass

from adapter.matrix.delivery.inbox import Entry
from core.store import Birth
from doctor_tool.compare import Finding


@dataclass(frozen=True)
class InboxSummary:
    pending: int
    oldest_s: float | None  # age of the oldest update, from its origin_server_ts


@dataclass(frozen=True)
class Diagnosis:
    """``consistent``: the DB and the homeserver agree now. ``heals_by_itself``: whatever
    differs, the bot settles by itself (exit 0); else suspect a bug (exit 1)."""

    birth: Birth | None
    inbox: InboxSummary
    findings: tuple[Finding, ...]
    requests: int = 0  # homeserver requests made

    @property
    def consistent(self) -> bool:
        return all(f.state == "ok" for f in self.findings)

    @property
    def heals_by_itself(self) -> bool:
        return all(f.heals for f in self.findings)


def inbox_summary(entries: tuple[Entry, ...], now: float) -> InboxSummary:
    stamps = [e.update.ts for e in entries if e.update.ts > 0]
    return InboxSummary(len(entries), round(now - min(stamps) / 1000, 1) if stamps else None)
