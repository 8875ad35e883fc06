"""Healing (SPEC §6): the I/O shell that fetches, decides and writes (``healer``) and the pure
decision over a room's state (``room_state``). The link that decides when to heal is
``chain.healing``."""
