"""The homeserver client: one method per request with one typed error (``client``), and the
saved session it logs in with (``session``)."""
