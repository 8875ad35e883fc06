"""The command table: each ``!command``'s name, usage and the flags it declares, and
``parse_command``. No I/O and no handler code.

This is aiogram's *handler flags* idea: a command declares what it needs (``in_lobby``,
``needs_space``, ``lists_space``), the links of the chain read those flags (the healing
link heals the sender's Space for ``needs_space``), and the handlers in
``handlers/commands.py`` implement each command's ``run``. So the chain never imports a
handler, and a handler never heals.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CommandSpec:
    name: str
    usage: str
    summary: str
    # The handler flags:
    in_lobby: bool = False  # works in the lobby too, not only in a chat room
    needs_space: bool = False  # the healing link makes sure data["user"] is set
    lists_space: bool = False  # the healing link heals every chat of the Space first


@dataclass(frozen=True)
class Command:
    name: str
    args: str
    spec: CommandSpec = field(repr=False)


COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in [
        CommandSpec(
            "new", "!new [title]", "start a new chat room", in_lobby=True, needs_space=True
        ),
        CommandSpec(
            "chats", "!chats", "list your chats", in_lobby=True, needs_space=True, lists_space=True
        ),
        CommandSpec("rename", "!rename <title>", "rename this chat"),
        CommandSpec("archive", "!archive", "archive this chat (asks to !confirm)"),
        CommandSpec("confirm", "!confirm", "confirm a pending !archive"),
        CommandSpec("cancel", "!cancel", "drop a pending !archive", in_lobby=True),
        CommandSpec("help", "!help", "show this help", in_lobby=True),
    ]
}
UNKNOWN = CommandSpec("unknown", "", "", in_lobby=True)


def parse_command(body: str) -> Command:
    """``"!rename  New title"`` -> Command("rename", "New title"). Names are case-insensitive;
    any whitespace (a tab, a newline) ends the name."""
    head, args = (body.strip()[1:].split(maxsplit=1) + ["", ""])[:2]
    name = head.lower()
    return Command(name, args.strip(), COMMANDS.get(name, UNKNOWN))
