"""The jobs' compiled (numba) kernels: the notice a run shows while a first run compiles them."""

from __future__ import annotations

import sys


def notice_compiling(job: str, kernels, what: str) -> None:
    """One line on stderr when a compiled kernel is not yet loaded in this process: the first run
    compiles it (tens of seconds, during which a progress bar would not move)."""
    if any(not k.signatures for k in kernels):
        from tqdm import tqdm

        tqdm.write(f"{job}: {what}; the first run compiles it with numba (up to 2 minutes on a busy 2-core "
                   "machine), later runs load it from numba's cache", file=sys.stderr)
