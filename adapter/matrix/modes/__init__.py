"""The ways the bot runs, each a part of ``Bot`` (``bot.py``): ``syncing`` (one process
that syncs), ``pushed`` (an appservice the homeserver pushes to), ``replicas`` (one of several
processes on one PostgreSQL), and beside any of them a start's ``catching_up``. ``parts``
declares what they share."""
