"""Per-room workers over the inbox (SPEC §5, Delivery): the layer between the sync loop and
the dispatcher, and the only code that knows about order.

Each room is a *lane*, drained in order by one worker; lanes run concurrently and are not
bounded here: a lane mostly waits on the homeserver, and the one costly wait, the agent's
answer, is bounded where it happens (``Services.agent_slots``, ``LAMBDA_CONCURRENCY``). An
update the chain cannot handle yet (``RetryLater``) stays at the head of its lane, and in the
inbox, until a retry with backoff succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import structlog

from adapter.matrix.delivery.inbox import Entry, Inbox
from adapter.matrix.delivery.leases import current_lease
from adapter.matrix.ingest.update import RetryLater, Update
from core.store import StoreError
from core.store.contract import Lease, LeaseLost

log = structlog.get_logger()

Feed = Callable[[Update], Awaitable[None]]
# What an entry stands for: itself, or (a catch-up) the messages a read of its room finds.
Expand = Callable[[Update], Awaitable[list[Update]]]
MAX_ATTEMPTS = 24  # with the backoff below: about 1.4 hours of retrying
MAX_BACKOFF_S = 300.0


def retry_delay(attempt: int, retry_after_ms: int | None) -> float:
    """Seconds before attempt ``attempt + 1``: the server's ``retry_after_ms`` when it gave
    one, else 1 s doubling up to 5 minutes."""
    if retry_after_ms:
        return retry_after_ms / 1000
    return min(2.0**attempt, MAX_BACKOFF_S)


class Delivery:
    """Drains the inbox through ``feed``: in order per room, concurrently across rooms. With
    replicas, a lane works under its room's lease (``push(..., lease)``): each entry is marked
    started and finished fenced with it, and a lane whose lease is lost stops at once."""

    def __init__(
        self,
        inbox: Inbox,
        feed: Feed,
        give_up: Feed,
        expand: Expand | None = None,
        on_idle: Callable[[], None] = lambda: None,
    ) -> None:
        self._inbox = inbox
        self._feed = feed
        self._give_up = give_up
        self._expand = expand or _itself
        self._lanes: dict[str, deque[Entry]] = {}
        self._workers: dict[str, asyncio.Task] = {}
        self._stopping = asyncio.Event()
        self._due: set[str] = set()  # lanes with an update to handle now (not a retry's wait)
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._quiet_since = 0.0  # when the last lane stopped handling (monotonic)
        self._leases: dict[str, Lease] = {}  # with replicas: the lease each lane works under
        self._on_idle = on_idle  # a lane ended

    def push(self, entries: Iterable[Entry], lease: Lease | None = None) -> None:
        """Queue entries already written to the inbox, and wake their lanes' workers."""
        for entry in entries:
            lane = entry.update.room_id
            self._lanes.setdefault(lane, deque()).append(entry)
            if lease is not None:
                self._leases[lane] = lease
            if lane not in self._workers:
                self._mark(lane, due=True)
                self._workers[lane] = asyncio.create_task(self._drain(lane))

    def busy(self, lane: str) -> bool:
        return lane in self._workers

    def drop(self, lane: str) -> None:
        """The lane's lease was lost: stop it where it is (another replica has the room; what
        it was handling is marked started, so that one looks in the room first)."""
        worker = self._workers.get(lane)
        if worker is not None:
            worker.cancel()

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._lanes.values())

    async def quiet(self, at_most: float, settle: float = 0.0) -> None:
        """Until no lane has had an update to handle for ``settle`` seconds, or ``at_most``
        seconds: background work (a start's sweep) gives way to the updates users wait for,
        and to what a user just answered often sends next."""
        deadline = time.monotonic() + at_most
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._quiet.wait(), left)
            except TimeoutError:
                return
            calm = settle - (time.monotonic() - self._quiet_since)
            if calm <= 0:
                return
            await asyncio.sleep(min(calm, max(0.0, deadline - time.monotonic())))

    def _mark(self, lane: str, due: bool) -> None:
        if due:
            self._due.add(lane)
            self._quiet.clear()
        else:
            self._due.discard(lane)
            if not self._due and not self._quiet.is_set():
                self._quiet.set()
                self._quiet_since = time.monotonic()

    async def close(self) -> None:
        """Finish the updates being handled, start no new one; the rest stays in the inbox."""
        self._stopping.set()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)

    async def _drain(self, lane: str) -> None:
        queue = self._lanes[lane]
        lease = self._leases.get(lane)
        current_lease.set(lease)  # this task's own context: what its sends are checked against
        try:
            while queue and not self._stopping.is_set():
                entry = queue[0]
                if entry.not_before > time.time():
                    self._mark(lane, due=False)
                    if await self._stopped_within(entry.not_before - time.time()):
                        break
                    self._mark(lane, due=True)
                later = await self._handle(entry, lease)
                if later is None:
                    queue.popleft()
                else:
                    queue[0] = later
        except LeaseLost as err:  # another replica has the room: it finishes what is left
            log.warning("delivery.lease_lost", lane=lane, error=str(err))
        except asyncio.CancelledError:
            if lease is None or self._stopping.is_set():
                raise
            log.warning("delivery.lease_lost", lane=lane, lease=lease.name, term=lease.term)
        except StoreError as err:  # the entry stays in the file: the next start retries it
            log.error("delivery.store_failed", lane=lane, error=str(err))
        finally:
            self._mark(lane, due=False)
            del self._workers[lane]
            del self._lanes[lane]
            self._leases.pop(lane, None)
            self._on_idle()

    async def _handle(self, entry: Entry, lease: Lease | None = None) -> Entry | None:
        """Feed one entry (or what it expands to). Returns None when it is finished, else its
        postponed self (or itself, when a stop came before it was)."""
        update = entry.update
        if lease is not None:  # also the check of the lease before any work
            await self._inbox.started(entry, lease)
        try:
            for each in await self._expand(update):  # in the lane: other rooms do not wait
                if self._stopping.is_set():  # a long catch-up: the rest waits in the inbox
                    return entry
                await self._feed(each)
        except RetryLater as later:
            if update.attempt + 1 < MAX_ATTEMPTS:
                delay = retry_delay(update.attempt, later.retry_after_ms)
                log.info(
                    "delivery.retry_scheduled",
                    room_id=update.room_id,
                    event_id=update.event_id,
                    attempt=update.attempt + 1,
                    retry_in_s=delay,
                    reason=str(later),
                )
                return await self._inbox.postpone(entry, delay, lease)
            log.error(
                "delivery.gave_up",
                room_id=update.room_id,
                event_id=update.event_id,
                attempts=update.attempt + 1,
                reason=str(later),
            )
            await self._give_up(update)
        await self._inbox.done(entry, lease)
        return None

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
            return True
        except TimeoutError:
            return False


async def _itself(update: Update) -> list[Update]:
    return [update]
