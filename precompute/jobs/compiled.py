"""The jobs' compiled (numba) kernels: the threads they run on (the kernels release the GIL), and
the notice a run shows while a first run compiles them."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[int, ThreadPoolExecutor] = {}


def kernel_pool(n: int) -> ThreadPoolExecutor:
    """One pool of ``n`` threads per process, shared by the jobs (their updates run one after another)."""
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="kernels")
    return _POOLS[n]


def notice_compiling(job: str, kernels, what: str) -> None:
    """One line on stderr when a compiled kernel is not yet loaded in this process: the first run
    compiles it (tens of seconds, during which a progress bar would not move)."""
    if any(not k.signatures for k in kernels):
        from tqdm import tqdm

        tqdm.write(f"{job}: {what}; the first run compiles it with numba (up to 2 minutes on a busy 2-core "
                   "machine), later runs load it from numba's cache", file=sys.stderr)
