"""hugetlb: whole 2 MiB pages are reported (docs/kernel.md rules 6 and 15) and the scan terminates."""

from __future__ import annotations

import pytest
from conftest import PAGE, copied_pages
from wpdump.tracking.tracker import Tracker

HUGE = 2 << 20
NR = "/proc/sys/vm/nr_hugepages"


@pytest.fixture
def hugepages():
    """Reserve 8 huge pages for the test (root), restore the setting afterwards."""
    with open(NR) as f:
        before = int(f.read())
    with open(NR, "w") as f:
        f.write(str(before + 8))
    with open(NR) as f:
        assert int(f.read()) >= before + 8, "could not reserve huge pages"
    yield
    with open(NR, "w") as f:
        f.write(str(before))


def test_hugetlb_written_page_reported_whole(target, hugepages):
    a = target.map(4 * HUGE // PAGE, "hugetlb")
    assert a % HUGE == 0
    target.cmd("poke", hex(a), "0")
    with Tracker(target.pid) as tr:
        assert copied_pages(tr.initial, a, a + 4 * HUGE) == set(range(a, a + HUGE, PAGE))
        assert not copied_pages(tr.harvest(), a, a + 4 * HUGE)
        target.cmd("poke", hex(a), str(2 * HUGE // PAGE + 5))  # one byte in the third huge page
        h = tr.harvest()
        assert copied_pages(h, a, a + 4 * HUGE) == set(range(a + 2 * HUGE, a + 3 * HUGE, PAGE))
