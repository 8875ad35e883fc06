"""A reverse proxy on 127.0.0.1 in front of the real Synapse that can inject failures
(error statuses, 429 with retry_after_ms, dropped connections) into chosen requests, or
hold one request (before or after Synapse handled it) to kill the bot at that point. It
notes the path of every request it receives (``requests``)."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from aiohttp import ClientSession, web


@dataclass
class Fault:
    pattern: re.Pattern[str]
    status: int  # 0: drop the connection
    body: dict
    remaining: int


@dataclass
class Hold:
    method: str
    pattern: re.Pattern[str]
    skip: int  # matching requests let through before the one held
    forward: bool  # True: Synapse handles it, the answer is held; False: it never arrives
    reached: asyncio.Event = field(default_factory=asyncio.Event)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.hits: list[str] = []  # the paths of the requests a fault answered
        self.requests: list[str] = []  # "METHOD path" of every request, in order
        self.holds: list[Hold] = []
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self.url = ""

    def fail(
        self, path_regex: str, status: int, body: dict | None = None, times: int = 1_000_000
    ) -> None:
        self.faults.append(Fault(re.compile(path_regex), status, body or {}, times))

    def heal(self) -> None:
        self.faults.clear()
        self.holds.clear()

    def hold(
        self, method: str, path_regex: str, nth: int = 1, forward: bool = True
    ) -> asyncio.Event:
        """Hold the ``nth`` matching request forever; the event is set when it is reached."""
        hold = Hold(method, re.compile(path_regex), nth - 1, forward)
        self.holds.append(hold)
        return hold.reached

    async def start(self) -> None:
        self._session = ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=50 * 2**20)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests.append(f"{request.method} {path}")
        for fault in self.faults:
            if fault.remaining > 0 and fault.pattern.search(path):
                fault.remaining -= 1
                self.hits.append(path)
                if fault.status == 0:
                    assert request.transport is not None  # a request being handled has one
                    request.transport.close()
                    return web.Response(status=502)
                return web.json_response(fault.body, status=fault.status)
        hold = self._hold_for(request.method, path)
        if hold is not None and not hold.forward:
            hold.reached.set()
            await asyncio.Event().wait()  # until the bot is killed and the proxy stopped
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        assert self._session is not None  # made by start()
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            payload = await upstream.read()
            out = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() in ("content-type", "content-encoding")
            }
        if hold is not None:
            hold.reached.set()
            await asyncio.Event().wait()
        return web.Response(status=upstream.status, body=payload, headers=out)

    def count(self, path_regex: str) -> int:
        """How many requests so far had a path matching ``path_regex``."""
        pattern = re.compile(path_regex)
        return sum(1 for path in self.requests if pattern.search(path))

    def _hold_for(self, method: str, path: str) -> Hold | None:
        for hold in self.holds:
            if hold.method == method and hold.pattern.search(path):
                if hold.skip == 0:
                    self.holds.remove(hold)
                    return hold
                hold.skip -= 1
        return None
