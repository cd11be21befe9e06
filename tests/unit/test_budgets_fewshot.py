"""Few-shot fits have a CPU budget: their own bounded pool (never the threads that decode images), and a fit
that no request waits for any more is dropped before it starts or stopped while it runs."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from handlers.executor import Executors
from handlers.context import FewShotConfig, FewShotHeads
from ml.fewshot import FitCancelled, SupportSet, ZeroShotWeights, fit_few_shot


def _support(classes: int = 3, per_class: int = 4, dim: int = 16) -> tuple[SupportSet, ZeroShotWeights]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim))
    vectors = centres.repeat(per_class, 0) + rng.normal(size=(classes * per_class, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    names = [f"c{i}" for i in range(classes)]
    labels = [name for name in names for _ in range(per_class)]
    weights = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    return SupportSet.from_examples(vectors.astype(np.float32), labels, names), ZeroShotWeights(weights.astype(np.float32), 100.0)


@pytest.mark.parametrize("method", ["auto", "linear_probe", "tip_adapter"])
def test_a_fit_stops_when_asked(method):
    support, zero_shot = _support()
    assert fit_few_shot(support, method, zero_shot).method in ("linear_probe", "tip_adapter")
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 2  # let it start, then stop

    with pytest.raises(FitCancelled):
        fit_few_shot(support, method, zero_shot, should_stop=should_stop)


class _SlowFit:
    """A fit that runs until told to stop (at most 10 s), recording where and how it ran."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.started = threading.Event()
        self.exited = threading.Event()
        self.stopped_by_flag = False
        self._lock = threading.Lock()

    def __call__(self, should_stop) -> object:  # noqa: ANN001
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.threads.append(threading.current_thread().name)
        self.started.set()
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if should_stop():
                    self.stopped_by_flag = True
                    raise FitCancelled("stop")
                time.sleep(0.01)
            raise AssertionError("never told to stop")
        finally:
            with self._lock:
                self.running -= 1
            self.exited.set()


async def test_a_fit_nobody_waits_for_is_stopped_and_one_not_started_never_runs():
    executors = Executors(cpu_workers=2, fit_workers=1)
    heads = FewShotHeads(FewShotConfig(max_examples=2000, head_cache_bytes=2**20, max_fit_cost=10**9))
    first, second = _SlowFit(), _SlowFit()
    try:
        running = asyncio.ensure_future(heads.get_or_fit("a", lambda should_stop: first(should_stop), executors))
        queued = asyncio.ensure_future(heads.get_or_fit("b", lambda should_stop: second(should_stop), executors))
        await asyncio.get_running_loop().run_in_executor(None, first.started.wait, 10)
        # decoding is never behind a fit: the CPU pool answers while the fit pool is busy
        name = await asyncio.wait_for(executors.on_cpu(lambda: threading.current_thread().name), 5)
        assert name.startswith("cls-cpu")
        for task in (queued, running):  # the handlers time out
            task.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        assert await asyncio.get_running_loop().run_in_executor(None, first.exited.wait, 5)
        assert first.stopped_by_flag and first.threads[0].startswith("cls-fit")
        await asyncio.sleep(0.3)
        assert not second.started.is_set()  # dropped from the fit pool's queue, never ran
        assert heads.cancelled == 2
    finally:
        executors.shutdown()


async def test_fits_share_a_bounded_pool_and_a_fit_other_requests_wait_for_goes_on():
    executors = Executors(cpu_workers=2, fit_workers=1)
    heads = FewShotHeads(FewShotConfig(max_examples=2000, head_cache_bytes=2**20, max_fit_cost=10**9))
    support, zero_shot = _support()
    fit = lambda should_stop: fit_few_shot(support, "tip_adapter", zero_shot, should_stop=should_stop)  # noqa: E731
    try:
        leaving = asyncio.ensure_future(heads.get_or_fit("k", fit, executors))
        staying = asyncio.ensure_future(heads.get_or_fit("k", fit, executors))
        await asyncio.sleep(0)
        leaving.cancel()
        result, fitted = await asyncio.wait_for(staying, 60)
        assert result.method == "tip_adapter" and heads.fits == 1 and heads.cancelled == 0
        slow = [_SlowFit() for _ in range(3)]
        waiting = [asyncio.ensure_future(heads.get_or_fit(f"s{i}", lambda should_stop, f=f: f(should_stop), executors))
                   for i, f in enumerate(slow)]
        await asyncio.get_running_loop().run_in_executor(None, slow[0].started.wait, 10)
        await asyncio.sleep(0.3)
        assert sum(f.started.is_set() for f in slow) == 1  # one fit thread: the others wait their turn
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        executors.shutdown()
