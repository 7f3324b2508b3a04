"""Choosing a GPU backend from the command line's --gpu-backend / --fake-gpus / --gpus."""

from __future__ import annotations

from pathlib import Path

from app.gpus.base import GpuProbe, ProbeError, TimedProbe
from app.gpus.fake import FakeProbe
from app.gpus.gputil import GputilProbe
from app.gpus.nvml import NvmlProbe

BACKENDS = ("auto", "nvml", "gputil", "fake")


class NoGpuBackend(Exception):  # noqa: N818 (name fixed by the agreed interface)
    """`auto` found no working backend; the message says why and how to simulate GPUs instead."""

    def __init__(self, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        tried = "; ".join(f"{backend}: {reason}" for backend, reason in reasons.items())
        super().__init__(
            f"no NVIDIA GPU was found ({tried}); run with --gpu-backend fake --fake-gpus FILE "
            "to simulate GPUs (see `gpusched demo`)"
        )


def make_probe(
    backend: str,
    fake_gpus: Path | None,
    timeout_s: float = 5.0,
    limit: int | None = None,
    only: tuple[int, ...] | None = None,
) -> TimedProbe:
    """Build the probe the scheduler polls; "auto" tries NVML, then GPUtil (nvidia-smi).

    `auto` with a fake GPU file uses the file: asking for simulated GPUs and then getting real ones
    (or an error) would be surprising. A fake file with a real backend is a usage error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown GPU backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "fake" or (backend == "auto" and fake_gpus is not None):
        if fake_gpus is None:
            raise ValueError("--gpu-backend fake needs --fake-gpus FILE")
        return TimedProbe(FakeProbe(fake_gpus), timeout_s, limit, only)
    if fake_gpus is not None:
        raise ValueError(f"--fake-gpus only works with --gpu-backend fake, not {backend}")
    if backend == "nvml":
        return TimedProbe(NvmlProbe(), timeout_s, limit, only)
    if backend == "gputil":
        return TimedProbe(GputilProbe(), timeout_s, limit, only)
    return _detect(timeout_s, limit, only)


def _detect(timeout_s: float, limit: int | None, only: tuple[int, ...] | None) -> TimedProbe:
    reasons: dict[str, str] = {}
    candidates: list[tuple[str, GpuProbe]] = [("NVML", NvmlProbe()), ("GPUtil", GputilProbe())]
    for label, probe in candidates:
        # Probed through TimedProbe, since detection can hang on a wedged driver too. The probe
        # that works is returned as is, already initialised, with its worker thread.
        timed = TimedProbe(probe, timeout_s, limit, only)
        try:
            found = timed.snapshot()
        except ProbeError as exc:
            reasons[label] = str(exc)
            continue
        if found:
            return timed
        reasons[label] = "no GPUs reported"
    raise NoGpuBackend(reasons)
