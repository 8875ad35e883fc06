"""The chain: one dispatcher (``dispatcher``) and its links (``middlewares``, the healing link
``healing``), what each link and handler is given (``context``, ``router``), what the user is
told when the bot cannot act now (``notices``), and the pure rules the links apply
(``access``, ``command_table``)."""
