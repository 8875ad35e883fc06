"""A small round-robin load balancer on 127.0.0.1, as an operator puts in front of appservice
replicas (SPEC §10): the homeserver's registration URL points at it, and it hands each request
to the next replica. Like nginx's passive health checks (``max_fails=1 fail_timeout=10s``), a
replica it cannot reach answers that request 502, so the homeserver pushes it again, and is
left out for ``FAIL_TIMEOUT_S``. ``pushed`` and ``failed`` say where each request went."""

from __future__ import annotations

import time
from collections import Counter

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from adapter.matrix.config import ListenAddr

FAIL_TIMEOUT_S = 10.0


class RoundRobin:
    def __init__(self, listen: ListenAddr, backends: list[ListenAddr]) -> None:
        self.listen = listen
        self.backends = backends
        self.pushed: Counter[ListenAddr] = Counter()  # requests a backend answered
        self.failed: Counter[ListenAddr] = Counter()  # requests a backend could not take
        self._down_until: dict[ListenAddr, float] = {}
        self._turn = 0
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    async def start(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=60))
        app = web.Application(client_max_size=50 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.listen.host, self.listen.port).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    def _next(self) -> ListenAddr:
        now = time.monotonic()
        for _ in self.backends:
            backend = self.backends[self._turn % len(self.backends)]
            self._turn += 1
            if self._down_until.get(backend, 0.0) <= now:
                return backend
        return self.backends[self._turn % len(self.backends)]  # all down: try anyway

    async def _handle(self, request: web.Request) -> web.Response:
        backend = self._next()
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        assert self._session is not None  # made by start()
        try:
            async with self._session.request(
                request.method, f"http://{backend}{request.path_qs}", data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                kind = upstream.headers.get("Content-Type", "application/json")
                status = upstream.status
        except (ClientError, OSError):
            self.failed[backend] += 1
            self._down_until[backend] = time.monotonic() + FAIL_TIMEOUT_S
            return web.json_response({"errcode": "M_UNKNOWN", "error": "bad gateway"}, status=502)
        self.pushed[backend] += 1
        return web.Response(status=status, body=payload, headers={"Content-Type": kind})
