"""Every way an event comes in, turned into ``update.Update``s that end in the inbox: a sync
round (``sync``), the start's sweep of every room (``sweep``), the catch-up rules after a start
without a token (``catchup``), and the pure rules they share (``events``)."""
