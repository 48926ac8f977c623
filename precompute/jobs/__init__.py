"""The precompute jobs, one package each: ``job.py`` (frozen config, accumulator, result),
``tables.py`` (rows, writer, the queries behind its pages) and, in ``__init__``, its ``JOB``
(a ``sweep.JobSpec``: how `precompute run` builds, sweeps and stores it, and its `show`).

``JOBS`` maps the name used on the command line (``--jobs``) to a function returning the spec,
so one job's dependencies never slow another's start."""

from __future__ import annotations

from importlib import import_module
from typing import Callable

NAMES = ("neurons", "heads", "embeddings", "rules", "explanations", "features", "feature-explanations")
# the jobs with tables of their own (features and feature-explanations use those of neurons and explanations)
TABLES_OF = ("neurons", "heads", "embeddings", "rules", "explanations")


def _loader(name: str) -> Callable:
    return lambda: import_module(f"{__name__}.{name.replace('-', '_')}").JOB


JOBS: dict[str, Callable] = {name: _loader(name) for name in NAMES}


def register_tables() -> None:
    """Import every job's tables so ``Base.metadata`` knows them (before creating a database)."""
    for name in TABLES_OF:
        import_module(f"{__name__}.{name}.tables")

