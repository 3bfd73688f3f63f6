"""Ways of getting per-sample gradient norms, by name.

``hooks`` per-layer norm rules on one batched forward + backward (never builds per-sample
          gradients), with an exact vmap/loop fallback for parameters no rule covers
``loop``  the per-sample reference (one backward per sample)
``vmap``  torch.func.vmap(grad), chunked
``auto``  the fastest exact backend for the job
"""
from __future__ import annotations

from ..job import ScoringJob
from .base import Backend
from .hooks import HooksBackend
from .loop import LoopBackend
from .vmap import VmapBackend

BACKENDS: dict[str, type[Backend]] = {
    "hooks": HooksBackend,
    "loop": LoopBackend,
    "vmap": VmapBackend,
}

# Tried in this order by backend="auto"; a backend may refuse a job by defining
# ``supports(job) -> bool`` as a classmethod.
AUTO_ORDER = ("hooks", "vmap", "loop")


def backend_names() -> list[str]:
    return ["auto", *BACKENDS]


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_names()}")


def resolve_backend(name: str, job: ScoringJob) -> Backend:
    check_backend_name(name)
    if name == "auto":
        for candidate in AUTO_ORDER:
            cls = BACKENDS.get(candidate)
            if cls is not None and getattr(cls, "supports", lambda _job: True)(job):
                return cls(job)
        raise RuntimeError("no backend supports this job")  # unreachable: loop supports all
    return BACKENDS[name](job)


__all__ = ["Backend", "BACKENDS", "backend_names", "check_backend_name", "resolve_backend"]
