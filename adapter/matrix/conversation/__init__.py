"""The conversation (SPEC §5): it lives in the room. ``turns`` reads room events into the
agent's turns (pure), ``history`` reads a room once a run and keeps it in step from sync and
from the bot's own answers (a cache that can always be lost), ``markdown`` renders answers."""
