"""A start without a token catches up beside the live path, whatever the mode: the sweep's
windows, each recorded and handled as it comes, and the give-way that lets users go first."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing, suppress
from functools import partial

import structlog

from adapter.matrix.delivery.inbox import Inbox, WriteFailed
from adapter.matrix.delivery.lanes import Delivery
from adapter.matrix.ingest.update import Update
from adapter.matrix.modes.parts import HOMESERVER_FAULTS, MAX_BACKOFF_S, BotParts, sleep_or_stop
from core.store.contract import LeaseLost

log = structlog.get_logger()

SWEEP_YIELD_S = 1.0  # at most this long, a sweep's next window waits for busy lanes
SWEEP_SETTLE_S = 0.3  # and until they have been quiet this long: a user just answered may write
# again at once; so may the users who were waiting for the bot, once it is back: the sweep's
# second window waits until the live path has run this long too.
GAVE_WAY_S = 0.005  # a give-way longer than this waited for users' updates


class CatchingUp(BotParts):
    """The start's catch-up and its give-way."""

    async def _catch_up(self, stop: asyncio.Event, inbox: Inbox, delivery: Delivery) -> bool:
        """A start without a token, beside the sync loop: the sweep looks at every room's
        latest events, a window at a time, most recently active first, and decides which rooms
        read back (``Ingest.sweep``). Each window is recorded as it comes and handled at once,
        before the next is asked for (the homeserver's time goes to users first); once the
        last one is recorded, the token is kept again. False: stopped before."""
        backoff = 1.0
        unrecorded: list[Update] = []
        self._catching_up_since = time.monotonic()
        while not stop.is_set():
            try:
                if unrecorded:  # decided, but the file refused them: never decided again
                    await self._deliver(await inbox.add(unrecorded))
                    unrecorded = []
                give_way = partial(self._give_way, delivery)
                async with aclosing(self.sweep.windows(give_way)) as windows:
                    async for window in windows:
                        unrecorded = self.ingest.sweep(window)
                        await self._deliver(await inbox.add(unrecorded))
                        unrecorded = []
                await inbox.release()
                self.ingest.swept()
                return True
            except (*HOMESERVER_FAULTS, WriteFailed) as err:
                log.warning(
                    "sync.catchup_failed", error=str(err) or type(err).__name__, retry_in_s=backoff
                )
            except LeaseLost as err:  # another replica syncs now: its start catches up
                log.info("sync.catchup_handed_over", error=str(err))
                return False
            except Exception:  # a bug: logged, retried like a fault, never silently gone
                log.exception("sync.catchup_crashed", retry_in_s=backoff)
            await sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        return False

    async def _give_way(self, delivery: Delivery) -> bool:
        """Before a sweep's next window, what users wait for goes first: a live round in hand
        (its updates not queued yet), then the lanes handling updates, and a moment after them
        (a user just answered often writes again at once), and the start's first moments (the
        users who waited for the bot write as it comes back); for at most SWEEP_YIELD_S and
        SWEEP_SETTLE_S, so that the sweep still goes on under a steady load. True: users' updates
        were waited for (the start's moments are not counted)."""
        if (back := SWEEP_SETTLE_S - (time.monotonic() - self._catching_up_since)) > 0:
            await asyncio.sleep(back)  # the bot is just back: its first live rounds go first
        started = time.monotonic()
        with suppress(TimeoutError):
            await asyncio.wait_for(self._round_done.wait(), SWEEP_YIELD_S)
        left = max(0.0, SWEEP_YIELD_S - (time.monotonic() - started))
        await delivery.quiet(left, settle=SWEEP_SETTLE_S)
        return time.monotonic() - started > GAVE_WAY_S
