"""The Matrix records the bot keeps (SPEC §4), typed and serialised in ``records`` over the
store contract of ``core.store``."""
