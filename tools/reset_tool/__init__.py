"""The dev reset tool's parts: what exists (facts), what to do about it (plan, pure),
what to tell the user (report), and doing it (local, server). CLI: tools/reset_local.py."""
