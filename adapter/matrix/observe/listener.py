"""The HTTP listener on ``LAMBDA_METRICS_ADDR``: ``/metrics`` and ``/health``, served by
aiohttp on the bot's own loop. Each answer is built from memory in microseconds, so serving
never holds the loop up, and a failing request is aiohttp's 500, never the bot's crash."""

from __future__ import annotations

import os

import structlog
from aiohttp import web

from adapter.matrix.config import ListenAddr
from adapter.matrix.observe.health import Health
from adapter.matrix.observe.metrics import TEXT_FORMAT, Metrics

log = structlog.get_logger()


class ListenerUnavailable(Exception):
    """An address cannot be listened on (in use, not an address of this host)."""


async def serve(
    app: web.Application, addr: ListenAddr, variable: str
) -> tuple[web.AppRunner, ListenAddr]:
    """Serve ``app`` on ``addr``, without an access log; the runner, and the address as bound
    (port 0 becomes a free port). ``ListenerUnavailable`` names ``variable``, what to change."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, addr.host, addr.port).start()
    except OSError as err:
        await runner.cleanup()
        raise ListenerUnavailable(
            f"{variable}={addr}: cannot listen there "
            f"({os.strerror(err.errno) if err.errno else err}); choose a free port on an "
            "address of this host"
        ) from err
    return runner, ListenAddr(*runner.addresses[0][:2])


class MetricsListener:
    """Serves one bot's metrics and health until ``stop``. Open it with ``start``."""

    def __init__(self, runner: web.AppRunner, addr: ListenAddr) -> None:
        self._runner = runner
        self.addr = addr  # as bound: port 0 became a free port
        self.url = f"http://{addr}"

    @classmethod
    async def start(cls, addr: ListenAddr, metrics: Metrics, health: Health) -> MetricsListener:
        """Listen on ``addr``; raises ``ListenerUnavailable`` when that is impossible."""

        async def serve_metrics(_: web.Request) -> web.Response:
            return web.Response(body=metrics.exposition(), headers={"Content-Type": TEXT_FORMAT})

        async def serve_health(_: web.Request) -> web.Response:
            report = health.report()
            return web.json_response(report.to_json(), status=200 if report.ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", serve_metrics)
        app.router.add_get("/health", serve_health)
        # No access log: a scrape every few seconds is not news.
        listener = cls(*await serve(app, addr, "LAMBDA_METRICS_ADDR"))
        log.info("metrics.listening", addr=str(listener.addr), url=listener.url)
        return listener

    async def stop(self) -> None:
        await self._runner.cleanup()
