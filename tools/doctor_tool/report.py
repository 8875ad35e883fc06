"""What the doctor tells: a readable report, or one JSON object (SPEC §9)."""

from __future__ import annotations

import itertools
import json
import textwrap
import time
from collections import Counter
from dataclasses import asdict
from typing import get_args

from doctor_tool.compare import Finding, RoomState
from doctor_tool.diagnosis import Diagnosis

WIDTH = 92
STATES: tuple[RoomState, ...] = get_args(RoomState)
LEGEND = """\
Legend:
  ok               the DB and the homeserver agree
  missing_locally  the homeserver has it, the DB does not: the bot heals it by itself, and
                   that heal logs the cause shown. local_reset / store_missing: the DB was
                   reset or lost after the room was made. inconsistent: the DB should have
                   known it (made after the DB, or partly held): suspect a bug or a crash
  stale_locally    the DB names a room the bot is not in (any more), a lobby its owner left,
                   or a chat no room carries
  mismatch         title, status, owner, kind, chat id or Space differ; a rename the bot has
                   not handled yet is said so, and follows by itself
  encrypted        the homeserver encrypted a room the bot made (an active chat room, or the
                   Space of an owner with no readable chat): the bot cannot read it. Not a bug:
                   the homeserver's setting, named in the detail with its remedy
Exit: 0 everything agrees or heals by itself; 1 a difference will not heal by itself
(suspect a bug); 2 the doctor cannot run (bad environment, no DB or session, no homeserver)."""


def as_json(diagnosis: Diagnosis) -> str:
    return json.dumps(
        {
            "consistent": diagnosis.consistent,
            "birth": asdict(diagnosis.birth) if diagnosis.birth else None,
            "inbox": asdict(diagnosis.inbox),
            "rooms": [
                {
                    "room_id": f.room_id,
                    "kind": f.kind,
                    "owner": f.owner,
                    "state": f.state,
                    "detail": f.detail,
                }
                for f in diagnosis.findings
            ],
        },
        indent=2,
        ensure_ascii=False,
    )


def as_text(
    diagnosis: Diagnosis, bot_id: str, homeserver: str, db: str, now: float | None = None
) -> str:
    now = time.time() if now is None else now
    counts = Counter(f.state for f in diagnosis.findings)
    lines = [
        f"Lambda doctor: {bot_id} on {homeserver}",
        f"  DB     {db}, {_birth(diagnosis, now)}",
        f"  inbox  {_inbox(diagnosis)}",
        f"  rooms  {len(diagnosis.findings)} examined: "
        + ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
        + f" ({diagnosis.requests} homeserver requests)",
    ]
    for owner, findings in itertools.groupby(diagnosis.findings, key=lambda f: f.owner):
        lines += ["", owner or "Other rooms the bot is in"]
        lines += [line for finding in findings for line in _finding(finding)]
    lines += ["", *textwrap.wrap(_verdict(diagnosis), WIDTH), "", LEGEND]
    return "\n".join(lines)


def _finding(f: Finding) -> list[str]:
    head = f"  {f.state:15}  {f.kind or '-':5}  {f.room_id or '(no room)'}  {f.name}"
    if not f.detail:
        return [head]
    return [
        head,
        *textwrap.wrap(f.detail, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6),
    ]


def _birth(diagnosis: Diagnosis, now: float) -> str:
    birth = diagnosis.birth
    if birth is None:
        return "no birth record (older than birth records): every heal logs cause=inconsistent"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(birth.at))
    return f"born {stamp} ({_age(now - birth.at)} ago), cause {birth.cause}"


def _inbox(diagnosis: Diagnosis) -> str:
    inbox = diagnosis.inbox
    if not inbox.pending:
        return "empty: every update the bot received is handled"
    oldest = f", the oldest from {_age(inbox.oldest_s)} ago" if inbox.oldest_s is not None else ""
    return f"{inbox.pending} update{'s' if inbox.pending > 1 else ''} pending{oldest}"


def _verdict(diagnosis: Diagnosis) -> str:
    if diagnosis.consistent:
        return "The DB and the homeserver agree (exit 0)."
    stuck = sum(1 for f in diagnosis.findings if not f.heals and f.state != "encrypted")
    encrypted = sum(1 for f in diagnosis.findings if f.state == "encrypted")
    odd = sum(1 for f in diagnosis.findings if f.cause == "inconsistent")
    warned = (
        (
            f" {odd} heal{'s' if odd > 1 else ''} will log cause=inconsistent, at warning: "
            "the DB should have known; suspect a bug or a crash."
        )
        if odd
        else ""
    )
    locked = (
        (
            f" {encrypted} room{'s' if encrypted > 1 else ''} the bot made "
            f"{'are' if encrypted > 1 else 'is'} encrypted by the homeserver, which the bot "
            "cannot read: change the homeserver's setting (see the detail)."
        )
        if encrypted
        else ""
    )
    if stuck:
        return (
            f"{stuck} difference{'s' if stuck > 1 else ''} will not heal by itself: "
            f"suspect a bug (exit 1).{locked}{warned}"
        )
    if encrypted:
        return f"{locked.strip()} (exit 1){warned}"
    return "Every difference heals by itself (exit 0)." + (
        warned or " The causes say the DB was reset or lost after those rooms were made."
    )


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{max(seconds, 0):.0f} s"
