"""The doctor's parts: the bot's DB read without changing it (local), the homeserver read with
the bot's saved session (server), the pure comparison (compare), one examination with a
second look at what differs (examine), and the report. CLI: tools/doctor.py."""
