"""`--max-drop D`: the smallest model whose validation top-1 is at most D points below FP32, found by bisection
over the sensitivity allocator's size budgets (a search with a sensitivity table), or by Optuna minimising
the packed size with the drop as a constraint (``DropConstrained``: a search without one).

The allocator gives, for each size budget, the per-layer weight bits that cost the least predicted
sensitivity; a larger budget never gives a worse prediction, so the measured validation drop shrinks
(roughly) as the budget grows. The search measures the top of the budget range first (if even that loses
more than D there is no answer), then halves the interval between the largest budget known to lose too much
and the smallest known to be within D, one trial at a time, until the interval is narrower than
``resolution`` (a fraction of the top budget) or the trials run out. The answer is the smallest measured
model within D (tune/results.py: ``best`` of a max-drop search). The test-set drop is reported, never used to
choose.
"""
from __future__ import annotations

import math
import pickle
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

CONSTRAINT = "val_drop"  # the Optuna constraint of a max-drop search without a table: the excess drop


class DropBisection(Searcher):
    """A Ray Tune searcher that proposes ``{"size_budget_mb": b, **fixed}`` one trial at a time."""

    def __init__(self, low_mb: float, high_mb: float, fp32_val_top1: float, max_drop: float,
                 fixed: dict[str, Any] | None = None, max_trials: int = 8, resolution: float = 0.01):
        super().__init__(metric="objective", mode="max")
        self.lo, self.hi = float(low_mb), float(high_mb)
        self.fp32_val, self.max_drop = float(fp32_val_top1), float(max_drop)
        self.fixed, self.max_trials, self.resolution = dict(fixed or {}), int(max_trials), float(resolution)
        self.top = float(high_mb)
        self.pending: dict[str, float] = {}
        self.measured: list[tuple[float, float | None, bool]] = []  # (budget, val_top1, within)
        self.hopeless = False  # the top budget already loses more than max_drop

    def _next(self) -> float | None:
        if self.hopeless or len(self.measured) + len(self.pending) >= self.max_trials:
            return None
        if not self.measured:
            return self.top
        if self.hi - self.lo <= self.resolution * self.top:
            return None
        return (self.lo + self.hi) / 2

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.pending:  # one at a time: the next budget depends on this result
            return None
        budget = self._next()
        if budget is None:
            return Searcher.FINISHED
        self.pending[trial_id] = budget
        return {**self.fixed, "size_budget_mb": budget}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        budget = self.pending.pop(trial_id, None)
        if budget is None:
            return
        val = None if error or not result else result.get("val_top1")
        ok = excess_drop(None if error else result, self.fp32_val, self.max_drop) <= 0
        self.measured.append((budget, val, ok))
        if ok:
            self.hi = min(self.hi, budget)
        elif budget >= self.top:
            self.hopeless = True
        else:
            self.lo = max(self.lo, budget)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def within(row: dict[str, Any], fp32_val_top1: float | None, max_drop: float) -> bool:
    """Whether a results row is within ``max_drop`` validation points of FP32."""
    v = row.get("val_top1")
    return fp32_val_top1 is not None and v is not None and v == v and fp32_val_top1 - v <= max_drop


def excess_drop(result: dict | None, fp32_val_top1: float, max_drop: float) -> float:
    """How far a trial's validation drop is beyond ``max_drop`` (<= 0: within; a trial that did not finish, or
    is over a size or latency budget, is infeasible: +inf)."""
    val = (result or {}).get("val_top1")
    if val is None or val != val or not result.get("final") or result.get("over_budget"):
        return math.inf
    return fp32_val_top1 - float(val) - max_drop


class DropConstrained(OptunaSearch):
    """--max-drop without a sensitivity table: Optuna proposes from the search space, minimising the packed
    size (comp_mb) subject to validation drop <= max_drop: each trial's excess drop is its Optuna constraint
    ``val_drop`` (Trial.set_constraint, set before Optuna is told the result; TPE ranks infeasible trials
    after feasible ones)."""

    def __init__(self, fp32_val_top1: float, max_drop: float, **kwargs):
        super().__init__(metric="comp_mb", mode="min", **kwargs)
        self.fp32_val, self.max_drop = float(fp32_val_top1), float(max_drop)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            excess = excess_drop(None if error else result, self.fp32_val, self.max_drop)
            ot_trial.set_constraint(CONSTRAINT, min(excess, 1e9))  # finite: Optuna's storages keep JSON
        super().on_trial_complete(trial_id, result, error)
