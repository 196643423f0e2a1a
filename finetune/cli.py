"""What the small command-line tools share (generate, merge, quantize, footprint): key=value arguments and
the shape of a user error, one "finetune.TOOL: ..." block on stderr and exit code 2, as `python -m finetune`'s."""

from __future__ import annotations

import sys
from typing import NoReturn, Optional

from finetune.config import suggest_key


def fail(tool: str, message: str) -> NoReturn:
    """End a tool on a user error: the message (what was wrong and how to fix it) and exit 2."""
    print(f"finetune.{tool}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_key_values(argv: list[str], keys: dict[str, Optional[str]],
                     repeated: tuple[str, ...] = ()) -> tuple[dict[str, str], dict[str, list[str]], list[str]]:
    """`key=value` arguments of the small CLIs (generate, merge): the values (defaults filled in), the
    values of `repeated` keys in order, and the problems (an unknown key gets the key that was meant)."""
    values = {k: v for k, v in keys.items() if v is not None}
    lists: dict[str, list[str]] = {k: [] for k in repeated}
    problems = []
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"'{item}' is not key=value (keys: {', '.join(keys)})")
        elif key in lists:
            lists[key].append(value)
        elif key not in keys:
            hint = suggest_key(key, list(keys))
            problems.append(f"unknown key '{key}'" + (f": did you mean '{hint}'?" if hint else f"; keys: {', '.join(keys)}"))
        else:
            values[key] = value
    return values, lists, problems
