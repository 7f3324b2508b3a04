"""Small helpers shared by the tests (import as `from tests.helpers import wait_until`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(fn: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """Poll `fn` until it returns something truthy and return that; fail after `timeout`.

    For waiting on real processes and tmux: correctness never depends on a bare sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {fn!r}")
        time.sleep(interval)
