"""Transport: the homeserver's requests (``homeserver``), the saved session (``session``), and
a sync round turned into updates (``ingest``)."""
