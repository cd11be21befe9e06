"""Admission: a request is checked against the worker's budgets before any work starts.

Every handler estimates what its request will cost (decode pixels, model memory, few-shot fit work, bytes of
files it must read) and calls :func:`admit` with a :class:`Budget` before it spends anything. A request over
a budget is refused with one error shape: ``invalid_request`` whose message names the estimate, the budget
and the ``CLS_*`` setting that sets it, e.g.::

    training memory: estimated 29,812 MiB > budget 8,192 MiB (CLS_TRAINING_MEMORY_BUDGET_MB): vit_gigantic...

Refusals are counted by budget in ``cls_admission_refused_total{budget}``. Each budget is then enforced
again where the resource is spent (the decode budget's semaphore, the few-shot fit pool, byte caps on reads),
so an estimate that is too low costs time, never the worker. docs/budgets.md lists every budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client import Counter

from handlers.errors import InvalidRequest

REFUSED = Counter("cls_admission_refused_total", "Requests refused at admission because an estimate was over a "
                  "budget", ["budget"])

Unit = Literal["bytes", "count"]
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Budget:
    """One bounded resource: ``name`` (the metric label, e.g. ``training_memory``), ``limit`` (in ``unit``),
    ``setting`` (the environment variable an operator changes it with)."""

    name: str
    limit: int | float
    setting: str
    unit: Unit = "bytes"

    def format(self, value: float) -> str:
        if self.unit == "bytes":
            return f"{value / _MIB:,.0f} MiB" if value >= _MIB else f"{value:,.0f} bytes"
        return f"{value:,.0f}"


class AdmissionRefused(InvalidRequest):
    """A request whose estimated cost is over a budget (``invalid_request``), with the numbers attached."""

    def __init__(self, budget: Budget, estimate: float, what: str, hint: str = "") -> None:
        self.budget = budget
        self.estimate = estimate
        message = (f"{budget.name.replace('_', ' ')}: estimated {budget.format(estimate)} > budget "
                   f"{budget.format(budget.limit)} ({budget.setting}): {what}")
        super().__init__(message + (f"; {hint}" if hint else ""))


def admit(budget: Budget, estimate: float, what: str, hint: str = "") -> None:
    """Refuse (``AdmissionRefused``, counted) when ``estimate`` is over ``budget``; ``what`` names the request's
    part that costs it (e.g. ``"vit_gigantic_patch14_clip_224 with batch_size 1"``)."""
    if estimate > budget.limit:
        REFUSED.labels(budget.name).inc()
        raise AdmissionRefused(budget, estimate, what, hint)
