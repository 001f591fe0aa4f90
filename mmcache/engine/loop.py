"""The one fit loop: epochs of a task's training steps, each closed by the same epoch end.

A trainer is a `FitTask`: it trains one epoch (`train_epoch`) and evaluates its selection units on the validation
rows (`validate`). A unit is what one selection is made for (a config of a lockstep group, one stacked probe, a
fine-tuning run): it holds its `Selector`, its `Schedule` (or None when the task schedules itself), its `EMA`
(or None) and its curve rows. The loop owns what every trainer does at an epoch end, in this order:

1. validation of every active unit with its weight average applied (`EMA.applied`);
2. one curve row per unit (`curve_row`, plus the task's extra columns);
3. selection of the best epoch (`Selector.update`, the task's `state` snapshotted when it improves);
4. the schedule's epoch end (plateau) with the selection metric;
5. early stopping: a unit whose selector stopped leaves the active set, and the run ends when none is left (the
   task may make every process agree first, `agree_stop`);
6. the callbacks' `on_epoch_end` (checkpoints, progress bars, notes), after the task's `epoch_done`.

Callbacks are told when the fit starts, after each epoch and when it ends; one with state returns it from
`state_dict` (a checkpoint keeps every callback's state, `callback_states`) and takes it back in
`load_state_dict`. Training progress reaches heads and losses through `progress_hook` at each step, which the
task calls; its per-step bookkeeping (schedule step, weight average update) is `Unit.step_end`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmcache.engine.optim import Schedule
from mmcache.engine.select import Selector, curve_row
from mmcache.engine.steps import EMA


class Unit(Protocol):
    """One selection: what the loop reads and updates at an epoch end (its selector is set before the fit)."""

    @property
    def selector(self) -> Selector | None: ...

    @property
    def sched(self) -> Schedule | None: ...

    @property
    def ema(self) -> EMA | None: ...

    @property
    def curves(self) -> list[dict[str, Any]]: ...


@dataclass(eq=False)
class FitUnit:
    """A plain `Unit` (a trainer without a member type of its own: fine-tuning)."""

    selector: Selector
    sched: Schedule | None = None
    ema: EMA | None = None
    curves: list[dict[str, Any]] = field(default_factory=list)


def step_end(unit: Unit) -> None:
    """After each optimizer step of `unit`: the schedule's step, then the weight average's update."""
    if unit.sched is not None:
        unit.sched.step()
    if unit.ema is not None:
        unit.ema.update()


@dataclass
class EpochRow:
    """What validation gives for one unit: its metrics (with `loss`), the epoch's train loss, the learning rate,
    the seconds the curve shows, and extra curve columns."""

    val: dict[str, float]
    train_loss: float
    lr: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class FitTask(Protocol):
    """A trainer driven by `fit`."""

    @property
    def units(self) -> Sequence[Any]:
        """Every Unit of the task."""

    def train_epoch(self, epoch: int, active: list[Any]) -> None:
        """Every training step of `epoch` (1-based) for the `active` units."""

    def validate(self, epoch: int, active: list[Any], seconds: float) -> Sequence[EpochRow | None]:
        """One row per active unit (None: not validated in this process); `seconds`: the epoch's training time."""

    def state(self, unit: Any) -> dict[str, Any]:
        """A snapshot of `unit`'s weights, taken when its epoch is the best so far."""

    def selected(self, epoch: int, improved: list[Any]) -> None:
        """After selection: `improved` are the units whose epoch is their best so far."""

    def agree_stop(self, stop: bool) -> bool:
        """Whether the run stops after this epoch, the same in every process (`stop`: this process's view)."""

    def epoch_done(self, epoch: int) -> None:
        """The task's own bookkeeping once an epoch is over (before the callbacks)."""

    def note(self, unit: Any, message: str) -> None:
        """A note about `unit` (early stopping)."""


class TaskBase:
    """Defaults of the optional `FitTask` hooks."""

    def selected(self, epoch: int, improved: list[Any]) -> None:
        return None

    def agree_stop(self, stop: bool) -> bool:
        return stop

    def epoch_done(self, epoch: int) -> None:
        return None

    def note(self, unit: Any, message: str) -> None:
        print(message, file=sys.stderr)


class Callback:
    """Hooks of the fit loop; a callback with state returns it from `state_dict` (kept in checkpoints)."""

    name = "callback"

    def on_fit_start(self, task: Any, epochs: int, start: int) -> None:
        """Before the first epoch (`start`: the epoch the fit begins or continues at)."""

    def on_epoch_end(self, task: Any, epoch: int) -> None:
        """After each epoch end (validation, selection, schedule, stopping)."""

    def on_fit_end(self, task: Any) -> None:
        """After the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        """This callback's state (empty: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""


def callback_states(callbacks: Sequence[Callback]) -> dict[str, dict[str, Any]]:
    """Every callback's state by name, for a checkpoint (callbacks without state left out)."""
    return {cb.name: s for cb in callbacks if (s := cb.state_dict())}


def load_callback_states(callbacks: Sequence[Callback], states: dict[str, dict[str, Any]] | None) -> None:
    """Give each callback its state back from `callback_states`."""
    for cb in callbacks:
        if states and cb.name in states:
            cb.load_state_dict(states[cb.name])


@contextmanager
def averaged(units: Sequence[Unit]) -> Iterator[None]:
    """Every unit holds its weight average (where it has one) inside the block."""
    with ExitStack() as stack:
        for u in units:
            if u.ema is not None:
                stack.enter_context(u.ema.applied())
        yield


def end_epoch(task: FitTask, epoch: int, active: list[Any], seconds: float) -> None:
    """Validation, curve rows, selection and the schedules' epoch end of the `active` units."""
    values: list[float | None] = []
    improved = []
    with averaged(active):  # evaluated and kept: the averages
        rows = task.validate(epoch, active, seconds)
        for u, row in zip(active, rows, strict=True):
            if row is None:
                values.append(None)
                continue
            u.curves.append({**curve_row(epoch, row.train_loss, row.val, row.lr, row.seconds), **row.extra})
            sel: Selector = u.selector
            value = row.val.get(sel.metric, math.nan)
            values.append(value)
            if sel.update(epoch, value, lambda u=u: task.state(u)):
                improved.append(u)
    for u, got in zip(active, values, strict=True):
        if got is not None and u.sched is not None:
            u.sched.epoch_end(got)
    task.selected(epoch, improved)


def fit(task: FitTask, epochs: int, start: int = 1, callbacks: Sequence[Callback] = (),
        clock: Callable[[], float] = time.perf_counter) -> None:
    """Train `task` from epoch `start` to `epochs` (or until every unit stopped early)."""
    for cb in callbacks:
        cb.on_fit_start(task, epochs, start)
    active = [u for u in task.units if not u.selector.stopped]
    epoch = start
    while epoch <= epochs and active:
        t0 = clock()
        task.train_epoch(epoch, active)
        end_epoch(task, epoch, active, clock() - t0)
        stop = task.agree_stop(all(u.selector.stopped for u in active))
        task.epoch_done(epoch)
        for cb in callbacks:
            cb.on_epoch_end(task, epoch)
        for u in active:
            if u.selector.stopped:
                task.note(u, f"early stop after epoch {epoch}: no better val {u.selector.metric} for "
                             f"{u.selector.stale} epochs")
        active = [] if stop else [u for u in active if not u.selector.stopped]
        epoch += 1
    for cb in callbacks:
        cb.on_fit_end(task)


class EpochBar(Callback):
    """A progress bar over the epochs (`mmcache.progress`), with the train loss and the selection metric of a single
    unit beside it."""

    name = "epoch_bar"

    def __init__(self, desc: str, disable: bool = False) -> None:
        self.desc, self.disable = desc, disable
        self.bar: Any = None

    def on_fit_start(self, task: Any, epochs: int, start: int) -> None:
        from mmcache.progress import bar

        self.bar = bar(total=epochs - start + 1, desc=self.desc, unit="ep", disable=self.disable)

    def on_epoch_end(self, task: Any, epoch: int) -> None:
        if len(task.units) == 1 and task.units[0].curves:
            u = task.units[0]
            m = u.selector.metric
            self.bar.set_postfix(loss=f"{u.curves[-1]['train_loss']:.3f}",
                                 **{f"val_{m}": f"{u.curves[-1].get('val_' + m, float('nan')):.4f}"}, refresh=False)
        self.bar.update(1)

    def on_fit_end(self, task: Any) -> None:
        self.bar.close()
