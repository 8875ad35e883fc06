"""Healing (SPEC §6): the link that decides when to heal (``middleware``), its I/O
(``healer``), the pure decision over room state (``room_state``) and the bot's markers
(``markers``)."""
