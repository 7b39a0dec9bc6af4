"""`--cpu-affinity`: which CPU cores each local process may use."""

from __future__ import annotations

import os
import re

_NAME = re.compile(r"(prefill|decode|colocated|router)(-\d+)?")


def parse_cpu_affinity(text: str) -> dict[str, set[int]]:
    """`prefill=0,decode=1` or `prefill=0-3,decode=4,5`: process (role or instance) -> CPU cores.

    A core list follows `NAME=`; a bare item after it (`5`, `6-7`) adds to the name before. Raises
    ValueError naming the bad item, or the cores this process may not use.
    """
    out: dict[str, set[int]] = {}
    name = None
    for item in (part.strip() for part in text.split(",")):
        if "=" in item:
            name, _, item = (x.strip() for x in item.partition("="))
            if not _NAME.fullmatch(name):
                raise ValueError(f"cpu affinity {text!r}: {name!r} is no process name; use a role (prefill, decode, "
                                 "colocated, router) or an instance (decode-1)")
            out.setdefault(name, set())
        if name is None:
            raise ValueError(f"cpu affinity {text!r}: start with NAME=CORES, e.g. prefill=0,decode=1")
        lo, dash, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"cpu affinity {text!r}: {item!r} is not a core number or range (3, 0-3)") from None
        if first < 0 or last < first:
            raise ValueError(f"cpu affinity {text!r}: {item!r} is not a core number or range (3, 0-3)")
        out[name].update(range(first, last + 1))
    usable = os.sched_getaffinity(0)
    for who, cores in out.items():
        if not cores <= usable:
            raise ValueError(f"cpu affinity {text!r}: {who} asks for cores {sorted(cores - usable)}, but this process "
                             f"may use only {sorted(usable)}")
    return out
