"""Bandwidth quantities that say whether they count bits or bytes.

A bandwidth on the wire is a string: a number, then a unit, optionally `/s` (every bandwidth is per
second, so `25Gbit` and `25Gbit/s` are the same). Units are case-sensitive:

- bytes: `B`, `kB`, `MB`, `GB`, `TB`, `PB` (powers of 1000) and `KiB`, `MiB`, `GiB`, `TiB`, `PiB` (powers of 1024);
- bits: `bit`, `kbit`, `Mbit`, `Gbit`, `Tbit`, `Pbit` (powers of 1000).

So `25Gbit` is 3.125 × 10⁹ bytes/s and `600GB` is 6 × 10¹¹ bytes/s. Forms read both ways are refused
rather than guessed: a bare number, a bare SI prefix (`25G`, Kubernetes' quantity without a unit),
`Gb`/`gb` and `Gbps`/`GBps` (gigabits to some readers, gigabytes to others).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_BYTE_UNITS = {f"{p}B": f for p, f in _PREFIX.items() if p != "K"} | {f"{p}B": f for p, f in _BINARY.items()}
_BIT_UNITS = {f"{p}bit": f / 8 for p, f in _PREFIX.items() if p != "K"}
UNITS: dict[str, float] = _BYTE_UNITS | _BIT_UNITS  # unit -> bytes per second of one unit
_QUANTITY = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]+)(?P<per>/s)?\s*$")
PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?\s*(" + "|".join(sorted(UNITS, key=len, reverse=True)) + r")(/s)?$"


MAX_BYTES_PER_S = 1e14  # 100 TB/s: far above any link, low enough to catch a unit slip of 10^3 or more


class BandwidthError(ValueError):
    """A bandwidth string that is malformed or ambiguous; the message says how to write it."""


def _hint(num: str, unit: str) -> str:
    first = unit[:1]
    prefix = ("k" if first in "kK" else first.upper()) if first and first in "kKmMgGtTpP" else ""
    return f"write {num}{prefix}bit for bits per second or {num}{prefix}B for bytes per second"


def parse_bandwidth(text: str) -> float:
    """Bytes per second of a bandwidth string such as `25Gbit`, `600GB` or `100Gbit/s`."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise BandwidthError(f"bandwidth {text!r} has no unit; {_hint(str(text), 'G')} (e.g. 25Gbit or 600GB)")
    m = _QUANTITY.match(text)
    if m is None:
        raise BandwidthError(f"bandwidth {text!r} is not a number followed by a unit, e.g. 25Gbit or 600GB")
    num, unit = m.group("num"), m.group("unit")
    if unit not in UNITS:
        if unit.lower().endswith("bps"):
            why = f"{unit!r} is read as bits by some and bytes by others"
        elif unit.lower().rstrip("b") in {p.lower() for p in _PREFIX}:
            why = f"{unit!r} does not say bits or bytes"
        else:
            why = f"unknown unit {unit!r} (known: {', '.join(UNITS)})"
        raise BandwidthError(f"bandwidth {text!r}: {why}; {_hint(num, unit)}")
    value = float(num) * UNITS[unit]
    if not 0 < value <= MAX_BYTES_PER_S:
        raise BandwidthError(f"bandwidth {text!r} must be positive and at most {format_bandwidth(MAX_BYTES_PER_S)}")
    return value


def format_bandwidth(bytes_per_s: float) -> str:
    """The canonical wire form: decimal gigabytes per second (`25Gbit` -> `3.125GB`)."""
    return f"{bytes_per_s / 1e9:.12g}GB"


Bandwidth = Annotated[
    float,
    BeforeValidator(parse_bandwidth),
    PlainSerializer(format_bandwidth, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": PATTERN,
                    "description": "Per second. Bytes: B, kB, MB, GB, TB (x1000), KiB, MiB, GiB (x1024); "
                                   "bits: bit, kbit, Mbit, Gbit, Tbit. E.g. 25Gbit, 600GB."}),
]
"""A bandwidth in bytes per second, written on the wire as a unit-bearing string."""
