"""Page accounting of the paged decode state, in pure Python: pages return on completion, hundreds of requests
of random sizes in random order leak and duplicate nothing, a full pool makes admission wait, and a request
larger than a pool is refused. Under sharding a slot only ever holds pages of its own part."""

import numpy as np
import pytest

from model1_jax.inference.paging import PagePool, PageTables, pages_needed


def test_pages_needed():
    # Entries complete below `reserve` positions: ⌊reserve / rate⌋; pages of 4 entries.
    assert [pages_needed(r, 4, 4) for r in (1, 3, 4, 16, 19, 20)] == [0, 0, 1, 1, 1, 2]
    assert pages_needed(127, 128, 64) == 0 and pages_needed(128, 128, 64) == 1


def test_pool_take_give():
    pool = PagePool(8, parts=2)
    assert pool.take(3, part=1) == [4, 5, 6] and pool.take(1, part=0) == [0]
    assert pool.in_use == 4 and pool.available(0) == 3 and pool.available(1) == 1
    pool.give([5, 0])
    assert pool.take(2, part=1) == [5, 7]  # lowest free first
    with pytest.raises(RuntimeError, match="returned twice"):
        pool.give([1])
    with pytest.raises(RuntimeError, match="2 pages requested from part 1, 0 free"):
        pool.take(2, part=1)
    with pytest.raises(ValueError, match="do not split"):
        PagePool(7, parts=2)


@pytest.mark.parametrize("parts", [1, 2])
def test_no_leak_over_hundreds_of_requests(parts):
    rng = np.random.default_rng(0)
    slots, page = 8, 4
    tables = PageTables({4: 24, 128: 8}, {4: 16, 128: 2}, slots=slots, page_size=page, parts=parts)
    running: dict[int, int] = {}  # slot -> reserve
    admitted = waited = 0
    queue = [int(r) for r in rng.integers(1, 192, 600)]  # up to 12 pages of the m=4 pool: fits one part
    while queue or running:
        if running and (rng.random() < 0.4 or not queue):  # a random running request finishes
            slot = int(rng.choice(list(running)))
            tables.release(slot)
            del running[slot]
        elif queue:
            free = [s for s in range(slots) if s not in running]
            fit = [s for s in free if tables.fits(s, queue[0])]
            waited += bool(free) and not fit
            if fit:
                tables.admit(fit[0], queue[0])
                running[fit[0]] = queue.pop(0)
                admitted += 1
        tables.check()  # every page free or held once, tables agree
        for slot, reserve in running.items():
            for rate, table in tables.tables.items():
                row = table[slot][table[slot] >= 0]
                assert len(row) == pages_needed(reserve, rate, page)  # pages in proportion to the length
                per = tables.pools[rate].per_part
                assert all(p // per == tables.part_of(slot) for p in row)  # the slot's own part only
    assert admitted == 600 and waited > 0
    assert tables.in_use() == {4: 0, 128: 0}
    assert (tables.tables[4] == -1).all() and (tables.tables[128] == -1).all()


def test_full_pool_and_never_fits():
    tables = PageTables({4: 4}, {4: 4}, slots=2, page_size=4)
    assert tables.never_fits(64) is None  # 16 entries = 4 pages: the whole pool, allowed
    assert "needs 5 pages of the m=4 pool (80 tokens), which holds at most 4" in tables.never_fits(80)
    tables.admit(0, 48)  # 3 pages
    assert not tables.fits(1, 32)  # 2 pages wanted, 1 free: wait
    assert tables.fits(1, 16)
    tables.release(0)
    assert tables.fits(1, 64)
    with pytest.raises(RuntimeError, match="already holds"):
        tables.admit(1, 4) or tables.admit(1, 4)
