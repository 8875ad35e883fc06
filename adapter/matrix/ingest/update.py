"""What every way in produces: an ``Update``, one event the bot acts on, normalised. The inbox
keeps updates, the lanes hand them to the chain, and ``RetryLater`` is how any layer says
that an update must wait and be tried again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "catchup" stands for a room's unanswered messages, read in its lane (ingest.catchup).
UpdateKind = Literal["message", "room_name", "invite", "encrypted", "missed", "catchup"]


@dataclass(frozen=True)
class Update:
    """One event the bot acts on, normalised from a sync round (see ``ingest``)."""

    kind: UpdateKind
    room_id: str
    sender: str
    event_id: str
    body: str = ""
    ts: int = 0  # origin_server_ts, ms
    catchup: bool = False  # from the first sync after a start without a token (SPEC §5)
    attempt: int = 0  # how many times handling it was postponed (the inbox retries it)
    # Another handling may have answered it: an earlier run left it in the inbox, or it is a
    # start's catch-up (``catchup.deferred``).
    replayed: bool = False

    @property
    def is_command(self) -> bool:
        return self.kind == "message" and self.body.lstrip().startswith("!")

    @property
    def may_be_answered(self) -> bool:
        """Whether an earlier attempt may have sent the answer already (SPEC §5)."""
        return self.replayed or self.attempt > 0

    @property
    def is_event(self) -> bool:
        """A room event a user sent (an invite or a missed-count update is not one)."""
        return self.kind in ("message", "encrypted")


class RetryLater(Exception):
    """The update cannot be handled now (the homeserver failed); keep it and retry."""

    def __init__(self, reason: str, retry_after_ms: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after_ms = retry_after_ms
