"""Host-side page accounting for a paged decode state (docs/serving.md §2): one pool of pages per compression
rate, shared by every slot, and the block tables that map a slot's entry pages to pool pages.

Pure Python and NumPy: no device work, so the accounting is tested (and reasoned about) on its own.

A request reserves, at admission, every page it can ever need: ⌊reserve / rate⌋ entries of each rate, where
`reserve` = prompt + max_new_tokens bounds the positions it will feed — ⌈entries / page_size⌉ pages per pool
(0 for a request shorter than the rate). Its pages return when it finishes. Reserving up front means a running
request never waits for a page (no preemption, no deadlock); admission waits instead, in arrival order.

Under a sharding layout the pages of each pool are split into as many equal parts as the batch (dimension 0
of every state array is split the same way): slot s lives on part s // (slots / parts) and takes pages of that
part only, so each device's sequences address only its own pages.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class PagePool:
    """The free pages of one pool, split into `parts` equal ranges. Lowest free page first."""

    def __init__(self, pages: int, parts: int = 1):
        if pages <= 0 or parts <= 0 or pages % parts:
            raise ValueError(f"page pool: {pages} pages do not split into {parts} equal parts")
        self.pages, self.parts, self.per_part = pages, parts, pages // parts
        # Each part's free list is a stack: popping from the end hands out its lowest page first.
        self._free = [list(range((p + 1) * self.per_part - 1, p * self.per_part - 1, -1)) for p in range(parts)]
        self._is_free = np.ones(pages, bool)

    def available(self, part: int = 0) -> int:
        return len(self._free[part])

    @property
    def in_use(self) -> int:
        return self.pages - sum(len(f) for f in self._free)

    def take(self, n: int, part: int = 0) -> list[int]:
        if n > len(self._free[part]):
            raise RuntimeError(f"page pool: {n} pages requested from part {part}, {len(self._free[part])} free")
        free = self._free[part]
        taken = free[len(free) - n:][::-1]
        del free[len(free) - n:]
        self._is_free[taken] = False
        return taken

    def give(self, pages: list[int]) -> None:
        for page in pages:
            part = page // self.per_part
            if not 0 <= page < self.pages or self._is_free[page]:
                raise RuntimeError(f"page pool: page {page} returned twice or never handed out")
            self._is_free[page] = True
            self._free[part].append(page)
        for part in {p // self.per_part for p in pages}:
            self._free[part].sort(reverse=True)


def pages_needed(reserve: int, rate: int, page_size: int) -> int:
    """Pages of a rate-`rate` pool that a request feeding positions below `reserve` can fill."""
    return -(-(reserve // rate) // page_size)


class PageTables:
    """Every pool of a paged state, the block table of each slot, and who holds what.

    pools: compress rate -> pages; width: compress rate -> table width (pages one slot can address).
    """

    def __init__(self, pools: Mapping[int, int], width: Mapping[int, int], *, slots: int, page_size: int,
                 parts: int = 1):
        if slots % parts:
            raise ValueError(f"page tables: {slots} slots do not split into {parts} parts")
        self.page_size, self.slots, self.parts = page_size, slots, parts
        self.pools = {rate: PagePool(pages, parts) for rate, pages in pools.items()}
        self.tables = {rate: np.full((slots, width[rate]), -1, np.int32) for rate in pools}
        self._held: dict[int, dict[int, list[int]]] = {}

    def part_of(self, slot: int) -> int:
        return slot // (self.slots // self.parts)

    def needed(self, reserve: int) -> dict[int, int]:
        return {rate: pages_needed(reserve, rate, self.page_size) for rate in self.pools}

    def never_fits(self, reserve: int) -> str | None:
        """Why a request of this reserve can never be admitted (None if it can)."""
        for rate, n in self.needed(reserve).items():
            limit = min(self.pools[rate].per_part, self.tables[rate].shape[1])
            if n > limit:
                return (f"it needs {n} pages of the m={rate} pool ({reserve} tokens), which holds at most {limit} for "
                        "one request")
        return None

    def fits(self, slot: int, reserve: int) -> bool:
        part = self.part_of(slot)
        return all(self.pools[rate].available(part) >= n for rate, n in self.needed(reserve).items())

    def admit(self, slot: int, reserve: int) -> None:
        """Gives a free slot the pages of a request of `reserve` tokens (the caller checked `fits`)."""
        if slot in self._held:
            raise RuntimeError(f"page tables: slot {slot} already holds pages")
        part = self.part_of(slot)
        held = {rate: self.pools[rate].take(n, part) for rate, n in self.needed(reserve).items()}
        for rate, pages in held.items():
            self.tables[rate][slot] = -1
            self.tables[rate][slot, :len(pages)] = pages
        self._held[slot] = held

    def release(self, slot: int) -> None:
        for rate, pages in self._held.pop(slot).items():
            self.pools[rate].give(pages)
            self.tables[rate][slot] = -1

    def in_use(self) -> dict[int, int]:
        return {rate: pool.in_use for rate, pool in self.pools.items()}

    def check(self) -> None:
        """Every page is either free or held by exactly one slot, and the tables say so (tests)."""
        for rate, pool in self.pools.items():
            held = [p for h in self._held.values() for p in h[rate]]
            free = [p for f in pool._free for p in f]
            assert sorted(held + free) == list(range(pool.pages)), f"m={rate}: pages lost or duplicated"
            in_tables = self.tables[rate][self.tables[rate] >= 0]
            assert sorted(in_tables.tolist()) == sorted(held), f"m={rate}: tables disagree with the holders"
