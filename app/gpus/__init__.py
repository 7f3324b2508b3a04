"""GPU probes: what the GPUs look like right now, from NVML, nvidia-smi (GPUtil) or a fake file.

The scheduler only ever uses `make_probe(...)`'s TimedProbe, so a wedged driver costs a
ProbeError per poll, never a hung scheduler.
"""

from app.gpus.base import GpuProbe, ProbeError, TimedProbe
from app.gpus.fake import FakeProbe, update_fake_gpu, write_fake_gpus
from app.gpus.gputil import GputilProbe
from app.gpus.nvml import NvmlProbe
from app.gpus.select import BACKENDS, NoGpuBackend, make_probe

__all__ = [
    "BACKENDS",
    "FakeProbe",
    "GpuProbe",
    "GputilProbe",
    "NoGpuBackend",
    "NvmlProbe",
    "ProbeError",
    "TimedProbe",
    "make_probe",
    "update_fake_gpu",
    "write_fake_gpus",
]
