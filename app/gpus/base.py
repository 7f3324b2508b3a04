"""What every GPU backend provides, and the timeout guard the scheduler always goes through."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from app.models import GpuSnapshot


class ProbeError(Exception):
    """A backend could not say what the GPUs look like right now (the message says why)."""


class GpuProbe(Protocol):
    """A source of GPU snapshots: NVML, nvidia-smi via GPUtil, or a fake JSON file."""

    name: str

    def snapshot(self) -> list[GpuSnapshot]:
        """All GPUs ordered by index; raises ProbeError when the backend fails."""
        ...


@dataclass
class _Call:
    """One snapshot request handed to the worker thread, and its outcome."""

    started_wall: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[GpuSnapshot] | None = None
    error: ProbeError | None = None


class TimedProbe:
    """Bounds every snapshot of `probe` by `timeout_s`, and keeps the first `limit` GPUs only.

    NVML and nvidia-smi block indefinitely when the driver is wedged, and a blocked call cannot be
    cancelled from Python. So calls run on one persistent daemon worker thread: a call that
    overruns is abandoned (ProbeError), and until it returns every later call fails at once with
    "still hung" instead of queueing behind it or starting another thread. Threads therefore
    never pile up, however long the driver stays stuck.
    """

    def __init__(
        self,
        probe: GpuProbe,
        timeout_s: float = 5.0,
        limit: int | None = None,
        only: tuple[int, ...] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"GPU probe timeout must be > 0 seconds, got {timeout_s!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"--gpus must be at least 1, got {limit}")
        self.probe = probe
        self.name = probe.name
        self.timeout_s = timeout_s
        self.limit = limit
        self.only = None if only is None else frozenset(only)  # --gpu-ids: the GPUs we may use
        self._requests: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._hung: _Call | None = None  # the abandoned call, until it finally returns
        # Serialises callers: each holds it for at most ~timeout_s, so waiting on it is bounded.
        self._lock = threading.Lock()

    def snapshot(self) -> list[GpuSnapshot]:
        with self._lock:
            if self._hung is not None:
                if not self._hung.done.is_set():
                    raise ProbeError(self._still_hung_message(self._hung))
                # It came back; its answer is stale by now, so ask afresh.
                self._hung = None
            call = _Call()
            self._ensure_worker()
            self._requests.put(call)
            if not call.done.wait(self.timeout_s):
                self._hung = call
                raise ProbeError(f"GPU probe {self.name!r} timed out after {self.timeout_s}s")
            if call.error is not None:
                raise call.error
            assert call.result is not None  # the worker sets exactly one of result/error
            return self._apply_limit(call.result)

    def _apply_limit(self, gpus: list[GpuSnapshot]) -> list[GpuSnapshot]:
        ordered = sorted(gpus, key=lambda gpu: gpu.index)
        if self.only is not None:
            ordered = [gpu for gpu in ordered if gpu.index in self.only]
        return ordered if self.limit is None else ordered[: self.limit]

    def _still_hung_message(self, call: _Call) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(call.started_wall))
        waited = time.monotonic() - call.started_mono
        return (
            f"GPU probe {self.name!r} still hung since {since} ({waited:.0f}s); "
            "not starting another call until it returns (is the NVIDIA driver stuck?)"
        )

    def _ensure_worker(self) -> None:
        # Started on first use rather than in __init__ so that building a probe costs nothing;
        # restarted only if it died, which _serve's catch-all should make impossible.
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(
                target=self._serve, name=f"gpusched-probe-{self.name}", daemon=True
            )
            self._worker.start()

    def _serve(self) -> None:
        while True:
            call = self._requests.get()
            try:
                call.result = self.probe.snapshot()
            except ProbeError as exc:
                call.error = exc
            except Exception as exc:
                # A backend bug must not kill the worker or leak a foreign exception type.
                call.error = ProbeError(f"GPU probe {self.name!r} failed: {exc!r}")
            finally:
                call.done.set()
