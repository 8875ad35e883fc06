"""Who may use the bot, and how much (SPEC §5): ``LAMBDA_ALLOWED_USERS`` glob patterns over
user ids, ``LAMBDA_MAX_CHATS`` active chats per user, and a per-user throttle on creating
rooms. Pure rules; the chain link and ``!new`` apply them."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

CREATION_WINDOW_S = 60.0


@dataclass
class Access:
    allowed: tuple[str, ...]
    max_chats: int
    creations_per_window: int = 5
    window_s: float = CREATION_WINDOW_S
    _created: defaultdict[str, deque[float]] = field(
        default_factory=lambda: defaultdict(deque), repr=False
    )

    def allows(self, user_id: str) -> bool:
        return any(fnmatchcase(user_id, pattern) for pattern in self.allowed)

    def creation_refused(
        self, user_id: str, active_chats: int, now: float | None = None
    ) -> str | None:
        """Why ``user_id`` may not create a chat room now (a message for them), or None."""
        if active_chats >= self.max_chats:
            return (
                f"You have {active_chats} active chats, the most I keep for one person. "
                "Archive one with !archive in its room, then try again."
            )
        now = time.monotonic() if now is None else now
        recent = self._created[user_id]
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        if len(recent) >= self.creations_per_window:
            wait = max(1, round(recent[0] + self.window_s - now))
            return (
                f"You are creating chats faster than I can keep up with. "
                f"Please try again in {wait} s."
            )
        return None

    def restore(self, user_id: str, stamps: list[float]) -> None:
        """What another replica recorded (with replicas the stamps are Unix seconds, kept in
        the store, and ``now`` is given as Unix seconds too)."""
        self._created[user_id] = deque(sorted(stamps))

    def creations(self, user_id: str) -> list[float]:
        return list(self._created[user_id])

    def record_creation(self, user_id: str, now: float | None = None) -> None:
        self._created[user_id].append(time.monotonic() if now is None else now)
