"""Interleave newsletters fairly inside one worker's assignment (pure).

When several newsletters are running, a worker's share is split evenly
between them (capped by what each has ready; what one cannot use goes to
the others), so a big newsletter enqueued first cannot starve a small one.
"""

from __future__ import annotations

from collections.abc import Mapping


def split_evenly(amount: int, ready: Mapping[int, int]) -> dict[int, int]:
    """How many of ``amount`` to take from each newsletter (only entries > 0)."""
    left = {nid: n for nid, n in ready.items() if n > 0}
    out: dict[int, int] = {}
    while amount > 0 and left:
        share, extra = divmod(amount, len(left))
        for i, nid in enumerate(sorted(left)):
            take = min(left[nid], share + (1 if i < extra else 0))
            if take:
                out[nid] = out.get(nid, 0) + take
                left[nid] -= take
                amount -= take
        left = {nid: n for nid, n in left.items() if n > 0}
        if share == 0 and extra == 0:
            break
    return out
