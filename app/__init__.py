"""gpusched: a GPU job scheduler for multi-GPU workstations."""

__version__ = "0.1.0"
