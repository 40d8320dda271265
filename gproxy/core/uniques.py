"""The unique ids gproxy submits: a retry's, which marks it as one, and a dead letter's.

Retries: `gpr:<n>.<tag>:<original unique>`, <n> the attempt, <tag> five characters drawn
when the Retrier starts, so that two gproxies (or two runs of one) never submit the same
retry unique: gearmand would attach the second submission to the first one's job, which
it drops unrun if that one's client left (a killed gproxy's). For an empty original,
`gpr:<n>.<tag>@<hash of the handle>` (empty uniques never coalesce, so each retry needs
its own); for an original too long to fit, `gpr:<n>.<tag>#<hash of the original>`. A
gproxy in front of the worker that runs a retry strips the marking, so the worker sees
the original unique on every attempt (except in the `#` case, where the worker sees the
retry unique itself). Dead letters: `gpr:dl:<hash of the job>`, which never matches.

Pure: the tag's randomness is the caller's `random.Random`.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Final

from .jobs import Payload

MAX_UNIQUE: Final = 63
"""gearmand truncates a 64-byte unique to 63 and then fails to coalesce; longer is refused."""
_RETRY_UNIQUE: Final = re.compile(rb"gpr:(\d{1,9})(?:\.[0-9a-z]{1,16})?([:@#])(.*)", re.DOTALL)
"""At most 9 digits: a unique from the network is parsed, and int() of thousands of digits
raises (servers other than gearmand may not cap uniques at 64 bytes)."""
_TAG_ALPHABET: Final = "0123456789abcdefghijklmnopqrstuvwxyz"


def retry_tag(rng: random.Random) -> bytes:
    return "".join(rng.choice(_TAG_ALPHABET) for _ in range(5)).encode()


def retry_unique(unique: bytes, handle: bytes, attempt: int, tag: bytes = b"") -> bytes:
    prefix = b"gpr:%d" % attempt + (b"." + tag if tag else b"")
    if not unique:
        return prefix + b"@" + hashlib.sha1(handle).hexdigest()[:32].encode()
    if len(prefix) + 1 + len(unique) <= MAX_UNIQUE:
        return prefix + b":" + unique
    return prefix + b"#" + hashlib.sha1(unique).hexdigest().encode()


def parse_retry_unique(unique: bytes) -> tuple[int, bytes] | None:
    """(attempt, the unique to show the worker) for a retry's unique, None for any other."""
    match = _RETRY_UNIQUE.fullmatch(unique)
    if match is None:
        return None
    attempt, kind, rest = match.groups()
    shown = rest if kind == b":" else b"" if kind == b"@" else unique
    return int(attempt), shown


def dead_letter_unique(function: bytes, unique: bytes, handle: bytes, payload: Payload) -> bytes:
    """A unique id of the dead letter's own: persistent queues key their rows on it, so an
    empty one would keep one dead letter per function across a gearmand restart. Derived from
    the job (a dead letter submitted again after a crash coalesces with the first), and from
    its payload too, since handles repeat after a gearmand restart."""
    digest = hashlib.sha1(b"\0".join((function, unique, handle, b"")))
    digest.update(payload)
    return b"gpr:dl:" + digest.hexdigest().encode()
