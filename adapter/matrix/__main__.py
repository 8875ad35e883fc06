"""``python -m adapter.matrix``: run the bot, configured by the environment (SPEC §3)."""

from __future__ import annotations

import sys

import structlog

from adapter.matrix.config import Config, ConfigError
from adapter.matrix.run import main
from core.log_setup import configure_logging

try:
    config = Config.from_env()
except ConfigError as err:
    configure_logging("json" if not sys.stderr.isatty() else "console", "info")
    structlog.get_logger().error("config.invalid", error=str(err))
    sys.exit(2)
configure_logging(config.log_format, config.log_level)
sys.exit(main(config))
