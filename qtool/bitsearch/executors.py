"""Executors: run `evaluator.evaluate(candidate)` for a batch of candidates, yielding each result as it
finishes (so the search logs it at once and a crash loses nothing that finished).

- `LocalExecutor(workers=1)`: in-process, sequential (no pickling, exceptions surface directly).
- `LocalExecutor(workers=N>1)`: a spawn process pool; the prepared evaluator is pickled once per
  worker (its initializer), torch gets cpu_count // N threads each.
- `RayExecutor(num_cpus=N)`: a local Ray instance (`ray.init(num_cpus=N)`), the evaluator put in
  the object store once; needs the optional `ray` extra (`pip install 'qtool[ray]'`).

Any object with `run(evaluator, candidates) -> iterator of (candidate, accuracy)` and `close()`
works as an executor.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import pickle
from typing import Iterator

from qtool.errors import QtoolError
from qtool.bitsearch.space import Candidate

_WORKER_EVALUATOR = None


def _init_worker(blob: bytes, threads: int) -> None:
    global _WORKER_EVALUATOR
    import torch

    torch.set_num_threads(threads)
    _WORKER_EVALUATOR = pickle.loads(blob)  # bytes this process pickled a moment ago
    _WORKER_EVALUATOR.threads = threads


def _worker_eval(c: Candidate) -> float:
    return _WORKER_EVALUATOR.evaluate(c)


class LocalExecutor:
    def __init__(self, workers: int = 1):
        if not isinstance(workers, int) or workers < 1:
            raise QtoolError(f"--workers must be >= 1, got {workers!r}")
        self.workers = workers
        self._pool: cf.ProcessPoolExecutor | None = None
        self._for: int | None = None

    def _ensure_pool(self, evaluator) -> cf.ProcessPoolExecutor:
        if self._pool is None or self._for != id(evaluator):
            self.close()
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                                initializer=_init_worker, initargs=(pickle.dumps(evaluator), threads))
            self._for = id(evaluator)
        return self._pool

    def run(self, evaluator, candidates: list[Candidate]) -> Iterator[tuple[Candidate, float]]:
        if self.workers == 1:
            for c in candidates:
                yield c, evaluator.evaluate(c)
            return
        pool = self._ensure_pool(evaluator)
        futures = {pool.submit(_worker_eval, c): c for c in candidates}
        try:
            for f in cf.as_completed(futures):
                yield futures[f], f.result()
        finally:
            for f in futures:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _require_ray():
    try:
        import ray
    except ImportError:
        raise QtoolError("--executor ray needs the optional package ray: pip install 'qtool[ray]'") from None
    return ray


class RayExecutor:
    def __init__(self, num_cpus: int = 2, address: str | None = None):
        self.ray = _require_ray()
        self.num_cpus = num_cpus
        self._started = False
        if not self.ray.is_initialized():
            kw = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
            self.ray.init(log_to_driver=False, **kw)
            self._started = True
        self._remote = self.ray.remote(num_cpus=1)(_ray_eval)
        self._ref = None
        self._for: int | None = None

    def run(self, evaluator, candidates: list[Candidate]) -> Iterator[tuple[Candidate, float]]:
        ray = self.ray
        if self._for != id(evaluator):
            evaluator.threads = 1  # one task per CPU Ray gives out
            self._ref, self._for = ray.put(evaluator), id(evaluator)
        pending = {self._remote.remote(self._ref, c): c for c in candidates}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    c = pending.pop(ref)
                    yield c, ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False


def _ray_eval(evaluator, c: Candidate) -> float:
    return evaluator.evaluate(c)


def make_executor(name: str, workers: int = 1):
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(num_cpus=max(1, workers))
    raise QtoolError(f"unknown executor {name!r}; choose local or ray")
