"""The chain: one dispatcher (``dispatcher``), its plain links (``middlewares``), what the user
is told when the bot cannot act now (``notices``), and the pure rules the links apply
(``access``, ``command_table``)."""
