"""Choose the intra-op thread count from measured step times, and keep checking.

Why not simply "one thread per core": torch's CPU kernels synchronise their OpenMP
threads several hundred times per decode step.  With the cores free that is fine
and 2 threads beat 1; when other processes share the cores, each barrier waits for
a descheduled thread and 2 threads were measured ~10x *slower* than 1 (2-core box
at load 8: 590 ms vs 55 ms per step).  Load changes over time, so the worker
periodically runs a few steps with the other setting and keeps the faster one.  It
also probes early when the current setting's cost moves far from what it was when last
judged, towards the setting such a move favours: dearer steps (other jobs started) try
fewer threads, cheaper steps (they ended) try more.  With probes grown rare on a quiet
machine, load that arrived later had left the engine on 2 threads at 50-860 ms a step
for ~100 steps where 1 thread took 25-95 ms.  Such early probes are spaced out, more
so after each one that changed nothing: on busy cores step costs swing 2x from one
step to the next, and a first version that probed on every swing spent 29 probes (9 of
20 s) in one 256-token answer.

A probe's first step decides alone when it is far off either way: 3x dearer than the current
setting ends it (hopeless), 3x cheaper switches at once (decisive) - the two settings are never
that far apart on free cores (2 threads ~1.5x faster), and on busy ones 2 threads cost 3-30x.
And a new tuner tries its fewest threads right after its very first step (a duel that acts only
when decisive): it used to run `probe` steps of the untested default before its first probe,
and a prefill and a decode tuner each did, so an engine started beside two busy jobs spent
~1.5 s of its first 128-token answer on 2-thread steps of often 70-460 ms (31-36 tok/s against 55-60
with 1 thread throughout: `benchmarks/backends.py --load 2`).
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def in_fresh_thread(fn: Callable[[], T], name: str = "archon-engine-loader") -> T:
    """``fn()`` in a thread of its own that ends when it returns (its result or exception comes back).

    Why: every thread that runs a parallel torch op keeps an OpenMP thread pool for as long as it lives,
    and libgomp counts the threads of all pools; once they outnumber the cores, every pool's barriers stop
    spinning and sleep instead.  A decode step synchronises hundreds of times, so loading the model in a
    long-lived thread (asyncio's executor, the main thread) and decoding in the engine's worker made each
    step ~2x slower on 2 cores (SmolLM2 bf16: 20 ms against 9.7 ms; 9.2 ms when the loader's thread had
    exited: ``python benchmarks/omp_pools.py``).  A loader thread that exits takes its pool along.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread as is
            box["error"] = e

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class ThreadSetting:
    """The worker thread's torch thread count as last applied: one record for the tuners that share the thread
    (decode steps and prefill chunks are judged apart, but whichever ran last left its setting in place)."""

    def __init__(self, set_threads: Callable[[int], None] = torch.set_num_threads):
        self._set = set_threads
        self.applied: int | None = None

    def apply(self, threads: int) -> None:
        if threads != self.applied:
            self._set(threads)
            self.applied = threads

    def forget(self) -> None:
        """A new worker thread: thread settings are per OS thread, so the next ``apply`` sets it afresh."""
        self.applied = None


class ThreadTuner:
    """Alternates exploit / probe phases over steps of one kind (decode steps; prefill chunks).

    ``before_step()`` applies the thread count for the coming step;
    ``after_step(seconds, work)`` records its time per unit of work (e.g. per
    sequence-position in the batch) so steps of different batch sizes compare.
    """

    def __init__(
        self,
        options: list[int],
        period: int = 48,
        probe: int = 4,
        margin: float = 0.9,
        max_period: int = 3072,
        shift: float = 1.6,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        setting: ThreadSetting | None = None,
    ):
        """``shift``: the median of the latest ``probe`` steps this many times above (or below 1/shift of) the cost
        the current setting was judged at calls for an early probe (at most one per ``_shift_gap`` steps)."""
        self.options = sorted(set(max(1, o) for o in options))
        self.current = self.options[-1]
        self.period = period
        self.max_period = max_period
        self._period_now = period
        self.probe = probe
        self.margin = margin
        self.shift = shift
        self._judged: float | None = None  # the current setting's median cost when it was last judged
        self._shift_gap = period  # fewest steps between early probes; doubles after one that changed nothing
        self._since_early = period
        self._early = False  # the running probe was an early one
        self.setting = setting or ThreadSetting(set_threads)  # shared with the other tuner of the same thread
        self._recent: deque[float] = deque(maxlen=probe)  # current setting, latest steps
        self._probe_times: list[float] = []
        self._probing: int | None = None
        # First probe right after `probe` steps: a bad default must not last a whole period.
        self._since_probe = period - probe
        self._duel = len(self.options) > 1  # not yet: one step of the fewest threads after the first step
        self._duelling = False  # the running probe is that duel: it acts only when decisive
        self._next_probe_idx = 0
        self.switches = 0
        self.probes = 0

    @property
    def active(self) -> int:
        return self._probing if self._probing is not None else self.current

    @property
    def probing(self) -> bool:
        """The coming step tries another setting (one that may be far slower: keep it small if it can be)."""
        return self._probing is not None

    def new_thread(self) -> None:
        """A new worker thread: its thread setting is applied afresh at the next step."""
        self.setting.forget()

    def before_step(self) -> None:
        self.setting.apply(self.active)

    def after_step(self, seconds: float, work: float = 1.0) -> None:
        cost = seconds / max(work, 1e-9)
        if len(self.options) < 2:
            return
        if self._probing is None:
            self._recent.append(cost)
            self._since_probe += 1
            self._since_early += 1
            if self._duel:
                self._duel = False
                self._duelling = True
                self._start_probe(self.options[0], early=False)
                return
            if len(self._recent) < self.probe:
                return
            if self._since_probe >= self._period_now:
                others = [o for o in self.options if o != self.current]
                self._start_probe(others[self._next_probe_idx % len(others)], early=False)
                self._next_probe_idx += 1
            elif (target := self._shift_target()) is not None and self._since_early >= self._shift_gap:
                self._start_probe(target, early=True)
                self._since_early = 0
            return
        self._probe_times.append(cost)
        base = statistics.median(self._recent)
        # A probe can cost a lot (a 2-thread step on busy cores took 20x a 1-thread one):
        # give up after one step when it is clearly worse, and switch after one when it is clearly better.
        first = len(self._probe_times) == 1
        hopeless, decisive = first and cost > 3 * base, first and 3 * cost < base
        if self._duelling:
            self._duelling = False
            if not decisive:  # one step against one: only a decisive gap tells; the regular first probe follows
                self._probing = None
                return
        if not (hopeless or decisive) and len(self._probe_times) < self.probe:
            return
        # The first probe step may pay the thread pool's warm-up: judge on the median.
        self.probes += 1
        if decisive or (not hopeless and statistics.median(self._probe_times) < self.margin * base):
            self.current = self._probing
            self.switches += 1
            self._recent = deque(self._probe_times, maxlen=self.probe)
            self._period_now = self.period
            self._shift_gap = self.period
            # A switch is a judgement too: no early probe within the next gap.  Right after one (e.g. to 1 thread on
            # busy cores) the first steps of the next request run on the scheduler's credit for the idle time between
            # requests (11 ms against 18-25 a step), which read as the load leaving: a 2-thread probe of 200-460 ms.
            self._since_early = 0
        else:  # the current setting holds: check less and less often (load rarely flips fast)
            self._period_now = min(2 * self._period_now, self.max_period)
            if self._early:
                self._shift_gap = min(2 * self._shift_gap, self.max_period)
        self._judged = statistics.median(self._recent)
        self._probing = None
        self._since_probe = 0

    def _start_probe(self, threads: int, early: bool) -> None:
        self._probing = threads
        self._early = early
        self._probe_times = []

    def _shift_target(self) -> int | None:
        """After a far move of the current setting's cost: the next setting that move favours (fewer threads
        when steps got dearer, more when cheaper), or None.  A far move with nowhere to go becomes the new
        reference, so that the opposite move later (the load leaving again) is seen."""
        if self._judged is None:
            return None
        now = statistics.median(self._recent)
        i = self.options.index(self.current)
        if now > self.shift * self._judged:
            if i > 0:
                return self.options[i - 1]
            self._judged = now
        elif now * self.shift < self._judged:
            if i + 1 < len(self.options):
                return self.options[i + 1]
            self._judged = now
        return None
