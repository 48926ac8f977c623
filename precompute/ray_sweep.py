"""Shards on Ray: ``--workers N`` starts a local Ray cluster, ``--ray-address ADDR`` joins one.

Each worker is a Ray actor that loads the model once and sweeps the shards it is sent with fresh
accumulators, returning them; the driver (``runs.execute``) merges them in shard order, writes
per-token output and checkpoints, exactly as for a local sweep. So 1 worker and N workers give
the same result. At most ``2 x workers`` shards are in flight, so the driver's memory stays
bounded.

Threads: on a local cluster each worker gets an equal share of this machine's cores (at least
one: two workers on two cores run one thread each, not two each fighting over the cores); on a
cluster joined with ``--ray-address``, as many as this process uses. ``TINYSCOPE_WORKER_THREADS``
overrides both. A matrix product can round its last bit differently with another thread count
(measured: stories260K's float32 forward differs in one MLP column at 1 vs 2 threads; the bundled
model's does not), so results are bit-identical to a one-process run with the same number of
threads per worker, and equal up to float rounding otherwise. Ray is an optional extra (``pip install 'tinyscope[ray]'``); nothing imports it unless
one of those options is given.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Iterator

from .sequences import Sequences


class SweepWorker:
    """One model replica: sweeps whole shards with fresh accumulators."""

    def __init__(self, model_id: str, device: str, batch_size: int, threads: int):
        import torch

        from .models import load_model
        from .sweep import return_freed_memory

        return_freed_memory()
        torch.set_num_threads(max(1, threads))
        self.lm = load_model(model_id, device=device)
        self.batch_size = batch_size

    def sweep(self, shard: Sequences, jobs: list[tuple[str, Any]]) -> bytes:
        """The shard's accumulators, pickled: Ray hands numpy arrays back read-only (zero-copy),
        and the driver merges into them, so they travel as bytes and are unpickled writable."""
        from .jobs import JOBS
        from .sweep import sweep_shard

        accs = [JOBS[name]().accumulator(self.lm, cfg) for name, cfg in jobs]
        return pickle.dumps(sweep_shard(self.lm, shard, accs, self.batch_size), protocol=pickle.HIGHEST_PROTOCOL)


def worker_threads(workers: int, ray_address: str | None, own: int) -> int:
    """Torch threads per worker (see the module docstring)."""
    if os.environ.get("TINYSCOPE_WORKER_THREADS"):
        return max(1, int(os.environ["TINYSCOPE_WORKER_THREADS"]))
    if ray_address:
        return max(1, own)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def ray_sweep(args, names: list[str]):
    """A ``RunSetup.sweep_shards`` that sends shards to Ray workers and yields (shard, accs) in order."""
    try:
        import ray
    except ImportError:
        raise ValueError("--workers and --ray-address need Ray: pip install 'tinyscope[ray]'") from None
    n = max(1, int(args.workers))
    if args.ray_address is None and n > (os.cpu_count() or 1) * 4:
        raise ValueError(f"--workers {n} is more than this machine can run; use --ray-address for a cluster")

    def go(shards: Iterator[Sequences], jobs: list, bar, totals=None) -> Iterator[tuple[Sequences, list]]:
        import torch

        started = False
        if not ray.is_initialized():
            if args.ray_address:
                ray.init(address=args.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
            started = True
        try:
            threads = worker_threads(n, args.ray_address, torch.get_num_threads())
            opts = {"num_gpus": 1} if args.device == "cuda" else {"num_cpus": 1}
            Worker = ray.remote(**opts)(SweepWorker)
            workers = [Worker.remote(str(args.model), args.device, args.batch_size, threads) for _ in range(n)]
            job_cfgs = [(spec.name, cfg) for spec, cfg in jobs]
            free = list(workers)
            in_flight: dict = {}  # object ref -> (shard, worker)
            done: dict[int, tuple[Sequences, list]] = {}
            order: list[int] = []  # shard indices in the order they were sent
            it = iter(shards)
            exhausted = False
            while True:
                while free and not exhausted and len(in_flight) + len(done) < 2 * n:
                    shard = next(it, None)
                    if shard is None:
                        exhausted = True
                        break
                    w = free.pop()
                    in_flight[w.sweep.remote(shard, job_cfgs)] = (shard, w)
                    order.append(shard.index)
                while order and order[0] in done:
                    shard, accs = done.pop(order.pop(0))
                    bar.update(shard.n_tokens)
                    yield shard, accs
                    del accs  # merged by now: not kept while the next shard is awaited
                if not in_flight:
                    if exhausted and not done:
                        return
                    continue
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                shard, w = in_flight.pop(ready[0])
                free.append(w)
                done[shard.index] = (shard, pickle.loads(ray.get(ready[0])))
        finally:
            if started:
                ray.shutdown()

    return go
