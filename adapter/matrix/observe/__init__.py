"""Seeing how the bot is doing (SPEC §9): its metrics, its health, and the HTTP listener
that serves both on ``LAMBDA_METRICS_ADDR``."""
