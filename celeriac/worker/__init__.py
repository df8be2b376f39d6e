"""The worker: a supervisor process and the worker processes it starts."""

from .supervisor import run_worker

__all__ = ["run_worker"]
