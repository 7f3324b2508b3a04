"""The dashboard's garbage-collector policy, on the real collector of this process."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from app.dashboard.heap import HeapKeeper


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()
    gc.collect()


def test_first_poll_collects_in_full_then_freezes() -> None:
    keeper = HeapKeeper(clock=lambda: 0.0)
    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage
    kept = Node()
    keeper.after_poll()
    assert gone() is None  # collected before the freeze, not frozen with the rest
    assert keeper.full_collections == 1
    assert gc.get_freeze_count() > 0
    assert not any(obj is kept for obj in gc.get_objects(2))  # frozen: no collection walks it


def test_later_polls_collect_the_young_and_freeze_again() -> None:
    clock = [0.0]
    keeper = HeapKeeper(full_every=600.0, clock=lambda: clock[0])
    keeper.after_poll()
    frozen = gc.get_freeze_count()
    clock[0] = 1.0
    young = Node()
    gone = weakref.ref(young)
    del young
    survivors = [Node() for _ in range(50)]
    keeper.after_poll()
    assert gone() is None  # young cyclic garbage is collected, never frozen
    assert keeper.full_collections == 1
    assert gc.get_freeze_count() >= frozen + len(survivors)


def test_a_full_collection_every_period_frees_what_was_frozen() -> None:
    clock = [0.0]
    keeper = HeapKeeper(full_every=600.0, clock=lambda: clock[0])
    keeper.after_poll()
    old = Node()
    gone = weakref.ref(old)
    clock[0] = 1.0
    keeper.after_poll()  # `old` is frozen now, alive
    del old
    clock[0] = 300.0
    keeper.after_poll()
    assert gone() is not None  # frozen garbage waits for the next full collection
    clock[0] = 601.0
    keeper.after_poll()
    assert gone() is None and keeper.full_collections == 2
