"""Seeded draws that depend only on what they are about (a seed and some names), never on processing order.

Every random choice the recipe makes per row (the embedded task's rows, AIF's per-prompt sampling seeds and
binarization draws) is keyed by its parts, so any worker can make any draw and a rerun makes the same ones.
"""

from __future__ import annotations

import hashlib
import random


def seeded_int(*parts: object) -> int:
    """A 64-bit integer from sha256 of the parts joined by '/'."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def seeded_rng(*parts: object) -> random.Random:
    return random.Random(seeded_int(*parts))
