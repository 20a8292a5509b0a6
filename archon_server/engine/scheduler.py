"""Continuous-batching scheduler: one worker thread owns the model and the KV cache.

Requests are queued from any thread (the asyncio side hands in a ``sink`` callback).
Between decode steps the worker admits new requests (prefill once, then copy the
prompt's KV to the ``n`` sample rows), drops cancelled ones, and runs one batched
decode step over every active sequence.  Active sequences always occupy cache slots
``0..B-1`` (finished ones are compacted away), so a step reads cache views, never
gathers.  A long prompt is prefilled in chunks that take turns with the decode steps
(``_prefill_due``), and a short one may be prefilled ahead of it (``_overtake``).

Why a thread and not the event loop: a step is ~20-60 ms of blocking torch work;
torch releases the GIL inside kernels, so the event loop (HTTP, other backends)
stays responsive.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import random
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import torch

from .constrain import Constraints
from ..exceptions import ContextOverflow, KVCacheFull
from .detokenize import IncrementalText, token_bytes
from .prefix_cache import PrefixCache
from .runner import KVCache, ModelRunner, default_threads, kv_budget
from .sampling import RowSampling, choice_seed, make_generator, sample_rows, token_logprobs
from .threads import ThreadSetting, ThreadTuner
from ..config import DEFAULT_PREFIX_CACHE_MB
from .types import DoneEvent, EngineStats, ErrorEvent, FinishEvent, GenParams, LogprobEntry, Sink, TokenEvent

__all__ = ["DoneEvent", "Engine", "EngineStats", "ErrorEvent", "FinishEvent", "GenParams", "GenerationHandle", "LogprobEntry",
           "Sink", "TokenEvent"]

log = logging.getLogger("archon.engine.scheduler")


class GenerationHandle:
    """Returned by :meth:`Engine.submit`; ``cancel()`` drops the request at the next step."""

    def __init__(self, req: "_Request"):
        self._req = req

    def cancel(self) -> None:
        self._req.cancelled = True

    @property
    def done(self) -> bool:
        return self._req.done


class _Request:
    def __init__(self, prompt: list[int], params: GenParams, sink: Sink, max_new: int):
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.max_new = max_new
        self.cancelled = False
        self.done = False
        self.outbox: list[Any] = []
        self.open_choices = params.n
        self.completion_tokens = 0
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.uncached: tuple[int, int] | None = None  # (prefix cache's ``changes``, tokens left to prefill) when last judged
        self.waited_for_room = False  # it waited for the KV cache's budget (counted once: EngineStats.kv_waits)
        self.started = False  # admitted once (a staged prompt put back to make room for decoding rows starts again)

    def flush(self) -> None:
        if self.outbox and not self.cancelled:
            events, self.outbox = self.outbox, []
            try:
                self.sink(events)
            except RuntimeError:  # the consumer's event loop is gone: nobody listens any more
                self.cancelled = True


class _Sequence:
    def __init__(self, req: _Request, index: int, slot: int, text: IncrementalText, sampling: RowSampling):
        self.req = req
        self.index = index
        self.slot = slot
        self.text = text
        self.sampling = sampling
        self.last = -1
        self.generated = 0
        self.finished = False


@dataclass
class _SpecRun:
    """A speculative request in flight: its round generator and its text so far."""

    req: _Request
    rounds: Any  # Generator[list[int], bool | None, (tokens, metrics)] from specdec.serve.speculative_session
    text: IncrementalText
    n: int = 0
    reason: str = "length"
    halt: bool | None = None  # sent with the next round (None starts the generator)


@dataclass
class _Job:
    """Work other than generation that needs the model (teacher-forced scoring): ``fn(runner)`` runs on
    the worker thread between steps, its result or exception goes to ``future``.  A step-wise job (``fn`` returns a
    generator, engine/scoring.py's ``Steps``) keeps it in ``steps`` and runs a forward per turn (Engine._job_turn)."""

    fn: Callable[[ModelRunner], Any]
    future: concurrent.futures.Future
    steps: Generator[int, int | None, Any] | None = None
    token_s: float = 0.0  # its last step's seconds per token


@dataclass
class _Prefill:
    req: _Request
    slot: int
    done: int = 0  # prompt tokens already in the cache
    overtaken_at: int = -1  # ``done`` when a short prompt last went ahead of this one (Engine._overtake)
    token_s: float = 0.0  # its last chunk's seconds per token (a token deep in a long prompt costs several times more)


class Engine:
    """Owns a :class:`ModelRunner`; serves :meth:`submit` calls from any thread."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        eos_ids: set[int],
        max_batch: int = 16,
        idle_poll_s: float = 0.5,
        threads: int | str = "auto",
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        kv_cache_mb: float | str | None = "auto",
    ):
        """``threads``: an int fixes torch's intra-op threads; ``"auto"`` tunes between 1 and all cores
        from measured step times (see :mod:`.threads`); ignored on CUDA.  ``prefix_cache_mb``: memory for
        prompt-prefix K/V kept across requests (:mod:`.prefix_cache`; 0 turns it off).  ``kv_cache_mb``: most memory
        of the slot KV cache (``"auto"``: :func:`.runner.kv_budget`'s share of the machine): a request that needs
        more waits for rows to finish, one that cannot fit alone is refused (:class:`KVCacheFull`, a 400), and a
        row that reaches the cache's end when it cannot grow ends with ``length``."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self._eos_tensor = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=runner.device)
        self._constraints = Constraints(tokenizer)
        self.max_batch = max(1, max_batch)
        self.idle_poll_s = idle_poll_s
        self.stats = EngineStats()
        # The cache starts small and grows on demand; after idle_poll_s with nothing to do it goes back to this size.
        self.initial_slots, self.initial_capacity = min(self.max_batch, 8), 512
        self.kv_budget = kv_budget(kv_cache_mb, runner.device)
        self.cache = self._new_cache()
        self._inbox: queue.Queue[_Request | _Job | None] = queue.Queue()
        self._jobs: deque[_Job] = deque()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Sequence] = []
        self._spec = SpeculativeLane(self)
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20))
        self._prefilling: _Prefill | None = None
        # A long staged prompt set aside while a short one is prefilled ahead of it (see _overtake); at most one.
        self._aside: _Prefill | None = None
        self.prefill_chunk = 256  # most tokens per prefill chunk while other sequences decode
        self.prefill_chunk_idle = 512  # ... and when nobody waits on it
        # A chunk is also cut to about this long, from its prompt's last chunk's cost per token (deep in a long
        # prompt a token costs 6x what it does at its start: attention). Why: a request that arrives waits for the
        # chunk in flight (512 tokens at position 6,000: 2.3 s), and rows decoding beside a long prompt take turns
        # with it (_prefill_due); past ~100 tokens a chunk's cost per token hardly falls (SmolLM2, 2 cores, at
        # position 6,000: 4.9 ms at 64, 4.6 at 128, 4.5 at 256 and 512).
        self.prefill_slice_s = 0.5
        # ... but not below this many tokens while no rows decode (beside decoding rows the cut keeps their streams
        # moving): on the AVX2 EPYC a chunk's cost per token kept rising below ~128 tokens (the weights read once a
        # chunk, per-call costs), so the cut chunks' measured cost cut the next ones further, and a 3,600-token prompt
        # alone ended in 32-token chunks: 19-29 s against 17-19 s with this floor (15 s in 512-token chunks, which a
        # request arriving meanwhile would wait up to 3.4 s for).
        self.prefill_min_chunk_idle = 128
        self.shared_prompt_min = 1024  # prompt tokens from which a request's rows read its K/V once a step (_shared_prompts)
        self._owed = 0.0  # decode time still owed to the rows for the last interleaved chunk (_prefill_due)
        self._job_went_last = False  # a job step had the last turn: a staged long prompt's chunk goes next (_job_due)
        self._token_s = 0.0  # the last chunk's seconds per token, any prompt's: a new prompt's first estimate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Idle this long, the worker thread ends and the next submission starts a new one ("parked"). Why: a
        # thread that ran torch ops keeps an OpenMP pool while it lives, and once a process holds more pool
        # threads than cores every pool's barriers sleep (engine/threads.py::in_fresh_thread): a second engine
        # that served one request (the lazily loaded `weak` model) took SmolLM2 from 97 to 57 tok/s on 2 cores.
        self.park_after_s = 2.0
        self._started = False
        self._parked = False
        self._worker_lock = threading.Lock()  # parking and waking agree on whether a worker runs
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, list[int]] = {}
        cores = default_threads()
        if runner.device.type != "cpu":
            options = [torch.get_num_threads()]
        elif threads == "auto":
            options = [1, cores]
        else:
            options = [int(threads)]
        self.threads = ThreadSetting()
        self.tuner = ThreadTuner(options, setting=self.threads)
        # Prefill chunks (and scoring job steps) are judged apart from decode steps: their cost per unit of work is
        # another kind (a compute-bound forward of hundreds of tokens, not a read of the weights), so one tuner could
        # not compare the two; and a tuner that watched decode steps only left a long prompt that arrived first on
        # busy cores at the untested default of 2 threads: a 4,900-token prefill beside five busy jobs took 228 s
        # wall and 147 CPU-s at 2 threads against 64 s and 30 CPU-s at 1 (spinning barriers). Chunks are long (up to
        # ~0.5 s, prefill_slice_s), so this one judges on 2 chunks and checks after 8 at first.
        self.prefill_tuner = ThreadTuner(options, period=8, probe=2, max_period=256, setting=self.threads)

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        with self._worker_lock:
            self._started = True
            self._start_worker()

    def _start_worker(self) -> None:
        """(Under ``_worker_lock``.)  A worker thread, unless one runs or the engine is shut down."""
        if self._thread is None and not self._stop.is_set():
            thread = threading.Thread(target=self._run, name="archon-local-engine", daemon=True)
            self._thread = thread  # (before _parked goes False: `alive` never sees neither)
            self._parked = False
            thread.start()

    def _wake(self) -> None:
        """After queueing work: a parked engine starts a worker.  The queue is written first and the
        parking worker checks it under the same lock, so no work is left without a worker."""
        if self._parked:
            with self._worker_lock:
                if self._parked:
                    self._start_worker()

    def _try_park(self) -> bool:
        """(Worker.)  End this thread if nothing at all is queued; True if it should return now."""
        with self._worker_lock:
            if not self._inbox.empty() or self._stop.is_set():
                return False
            self._parked = True  # (before _thread goes: `alive` never sees neither)
            self._thread = None
            return True

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        with self._worker_lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        """Started, not shut down, and its worker running or parked (a parked engine wakes on the next request)."""
        thread = self._thread
        return self._started and not self._stop.is_set() and (self._parked or (thread is not None and thread.is_alive()))

    @property
    def parked(self) -> bool:
        return self._parked

    @property
    def active_sequences(self) -> int:
        """Sequences being generated: the decode batch plus speculative requests (0 when idle)."""
        return len(self._rows) + len(self._spec)

    @property
    def queued_requests(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    def submit(self, prompt: list[int], params: GenParams, sink: Sink) -> GenerationHandle:
        """Queue a generation; ``sink`` receives lists of events from the worker thread."""
        if not prompt:
            raise ValueError("empty prompt")
        limit = self.runner.dims.max_positions
        if len(prompt) >= limit:  # not even one token would fit
            raise ContextOverflow(limit, len(prompt))
        if params.refuse_overflow and len(prompt) + params.max_tokens > limit:
            raise ContextOverflow(limit, len(prompt), params.max_tokens)
        if params.n < 1:
            raise ValueError("n must be >= 1")
        vocab = self.runner.dims.vocab
        bad = sorted(t for t in params.logit_bias or () if not 0 <= t < vocab)
        if bad:
            raise ValueError(f"logit_bias: token id(s) {bad[:5]} out of the vocabulary (0 to {vocab - 1})")
        max_new = max(0, min(params.max_tokens, limit - len(prompt)))
        if max_new and not params.speculable:  # (a speculative run has a one-slot cache of its own)
            cap = self.cache.round_capacity(len(prompt) + 1)
            need = self.cache.bytes_for(params.n, cap)
            if need > self.kv_budget:
                raise KVCacheFull(f"n={params.n} sequences of a {len(prompt):,}-token prompt ({params.n} x {cap:,} positions)",
                                  need, self.kv_budget)
        req = _Request(list(prompt), params, sink, max_new)
        self._inbox.put(req)
        self._wake()
        return GenerationHandle(req)

    def run_job(self, fn: Callable[[ModelRunner], Any]) -> concurrent.futures.Future:
        """Run ``fn(runner)`` on the worker thread between decode steps (the runner is not thread-safe);
        wrap the returned future with ``asyncio.wrap_future`` to await it.

        When ``fn`` returns a generator (a step-wise job: engine/scoring.py's ``Steps``, e.g. ``score_steps``), each
        step is one forward of at most the tokens sent to it, sized as a prefill chunk is (:meth:`_chunk_tokens`), and
        the steps take turns with the decode steps as a long prompt's chunks do (:meth:`_job_due`): a long scoring pass
        no longer stalls every stream for its whole length.  Its future stays pending until its last step, so
        cancelling it (``asyncio.wrap_future`` does when the awaiting task is cancelled: a deadline, a client gone)
        drops the job before its next step.  Jobs run one at a time, in order."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("engine shut down"))
        else:
            self._inbox.put(_Job(fn, fut))
            self._wake()
        return fut

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        # The engine's tensor rule (see KVCache): the worker creates and mutates tensors only in
        # inference mode, so the cache, sampling state and every intermediate are one kind of tensor.
        with torch.inference_mode():
            self.tuner.new_thread()  # thread settings are per OS thread: apply them in this worker
            self.tuner.before_step()
            idle_since: float | None = None
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception as e:  # the recovery itself failed: start the cache afresh, keep the queue
                    self._reset_cache(e)
                if self._rows or self._prefilling is not None or self._aside is not None or len(self._spec) or self._waiting or self._jobs:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= self.park_after_s and self._try_park():
                    return  # parked: nothing held, nothing queued (the idle cache was already given back)
            down = RuntimeError("engine shut down")
            self._fail(self._holders() + list(self._waiting) + self._drain_inbox(), down)
            while self._jobs:  # queued jobs (and one part-way through its steps) fail only at shutdown
                job = self._jobs.popleft()
                if job.steps is not None:
                    job.steps.close()
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(down)

    def _iteration(self) -> None:
        """One pass: admit, drop cancelled, one prefill chunk, one decode step, one round per speculative
        request.  A phase that raises fails the requests *it* was working on, and only those; the
        engine then goes back to a known state (:meth:`_recover`) and the next pass serves the rest."""
        try:  # (a request that fails to start is failed inside _admit)
            self._admit(block=not self._rows and self._prefilling is None and self._aside is None and not self._spec and not self._jobs)
            self._drop_cancelled()
        except Exception as e:  # dropping or compacting broke: no request was being computed
            self._recover(e, [])
        if self._jobs and self._job_due():  # one job, or one step of one, per pass; a failed job fails its caller only
            self._job_turn()
        if self._prefilling is not None and self._prefill_due():
            staged = self._prefilling.req
            try:
                self._prefill_chunk()
            except Exception as e:
                self._recover(e, [staged])
        if self._rows:
            batch = self._row_requests()
            try:
                self._step()
            except Exception as e:
                self._recover(e, batch)
        if self._spec:
            try:  # (a round that raises fails its own request inside the lane)
                self._spec.step()
            except Exception as e:
                self._recover(e, self._spec.requests())

    def _row_requests(self) -> list[_Request]:
        return list({id(s.req): s.req for s in self._rows}.values())

    def _holders(self) -> list[_Request]:
        """Requests holding engine state: decode rows, the staged prompt, speculative runs."""
        reqs = {id(r): r for r in self._row_requests()}
        for pf in (self._prefilling, self._aside):
            if pf is not None:
                reqs[id(pf.req)] = pf.req
        for r in self._spec.requests():
            reqs[id(r)] = r
        return list(reqs.values())

    def _drain_inbox(self) -> list[_Request]:
        """Take everything queued: requests are returned, jobs join ``_jobs``."""
        items: list[_Request] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return items
            if isinstance(item, _Job):
                self._jobs.append(item)
            elif item is not None:
                items.append(item)

    def _recover(self, err: BaseException, failed: list[_Request]) -> None:
        """After a failed phase: fail ``failed`` (they leave the batch and free their slots), then make
        sure what is left is consistent: survivors' rows compact at slots 0..B-1, the staged prompt
        right after them, the cache's tensors and lengths agreeing.  Queued requests are never failed."""
        log.error("local engine step failed: failing %d request(s); %d other(s) in the engine go on", len(failed),
                  len(self._holders()) + self.queued_requests - len(failed), exc_info=err)
        self._fail(failed, err)
        try:
            self._compact(force=True)
            if not self.cache.consistent():
                raise RuntimeError("KV cache left inconsistent")
        except Exception as e:
            self._reset_cache(e)

    def _reset_cache(self, err: BaseException) -> None:
        """Last resort when the cache itself is broken: the requests whose K/V lived in it (decode rows,
        the staged prompt) fail and the cache starts afresh.  Speculative runs keep their own caches
        and queued requests have none: both go on."""
        log.error("local engine: resetting the KV cache", exc_info=err)
        in_cache = self._row_requests() + [pf.req for pf in (self._prefilling, self._aside) if pf is not None]
        self._fail(in_cache, err)
        self._rows, self._prefilling, self._aside = [], None, None
        self.prefix.clear()  # its blocks are copies and stay right, but a broken cache may mean memory is short
        self.cache = self._new_cache()

    def _admit(self, block: bool) -> None:
        # Pull everything queued; block only when idle (nothing to decode or prefill).
        try:
            item = self._inbox.get(timeout=self.idle_poll_s) if block and not self._waiting else self._inbox.get_nowait()
            while True:
                if isinstance(item, _Job):
                    self._jobs.append(item)
                elif item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            if block and not self._waiting:
                self._shrink_idle_cache()
        self._resume_aside()
        self._overtake()
        while self._prefilling is None and self._aside is None and self._waiting:
            req = self._waiting[0]
            if req.cancelled:
                self._waiting.popleft()
                self._dropped(req)
                continue
            speculative = req.params.speculable and req.max_new > 0
            # A request bigger than max_batch runs alone rather than never.
            if speculative and len(self._rows) + len(self._spec) >= self.max_batch:
                break
            if not speculative and self._rows and len(self._rows) + req.params.n > self.max_batch:
                break
            self._waiting.popleft()
            try:
                self._start(req, speculative)
            except KVCacheFull as e:
                if self._holders():  # the rows in the cache leave room as they finish: it waits at the head
                    self._waiting.appendleft(req)
                    if not req.waited_for_room:
                        req.waited_for_room = True
                        self.stats.kv_waits += 1
                    break
                self._counted(req)
                self._recover(e, [req])
            except Exception as e:  # e.g. the cache could not grow: this request fails, the queue goes on
                self._counted(req)
                self._recover(e, [req])
            else:
                self._counted(req)

    def _counted(self, req: _Request) -> None:
        """``stats.requests`` counts a request once, however often it starts (a staged prompt can be put back)."""
        if not req.started:
            req.started = True
            self.stats.requests += 1

    def _overtake(self) -> None:
        """Let the next queued prompt, if short, be prefilled ahead of a long staged one.

        The engine prefills one staged prompt at a time, so every request queued behind a long prompt waited
        for all of its chunks: on the default server a 16-token request sent 2 s after a 6,800-token one took
        22.5 s instead of 0.4 s. A prompt that fits in one chunk (its part not in the prefix cache:
        :meth:`_left_to_prefill`) now goes first: the long one's partial K/V
        moves up by the short one's ``n`` slots (it stays just past where the short one's rows will be),
        waits there (``_aside``), and resumes once the short one's rows have joined the batch. At most one
        prompt is set aside, and the long one prefills at least one chunk between two overtakes, so a stream of
        short requests slows it (a chunk each, and a copy of its K/V so far) but cannot stop it.
        """
        pf = self._prefilling
        if (pf is None or self._aside is not None or not self._waiting or pf.done == pf.overtaken_at
                or len(pf.req.prompt) - pf.done <= self.prefill_chunk):
            return
        room = self.max_batch - len(self._rows) - pf.req.params.n
        # Not only the head: a short request queued behind a second long prompt would wait for both prefills.
        # (The first few dozen only: this runs every pass while a long prompt is staged.)
        for i, req in enumerate(itertools.islice(self._waiting, 64)):
            if (not req.cancelled and not req.params.speculable and req.max_new > 0 and req.params.n <= room
                    and self._left_to_prefill(req) <= self.prefill_chunk):
                break
        else:
            return
        n = req.params.n
        up = pf.slot + n
        try:
            self.cache.reserve(up + pf.req.params.n, len(pf.req.prompt) + 1)
        except KVCacheFull:  # no room for both: the short one waits its turn
            return
        self.cache.move_slot(pf.slot, up)
        pf.slot, pf.overtaken_at = up, pf.done
        self._aside, self._prefilling = pf, None
        self.stats.overtakes += 1
        del self._waiting[i]
        self._counted(req)
        try:
            self._start(req, False)  # staged at len(rows), just below the one set aside
        except Exception as e:  # this request fails; the one set aside (put back just past the rows) goes on
            self._recover(e, [req])
            self._resume_aside()

    def _left_to_prefill(self, req: _Request) -> int:
        """Tokens of a queued prompt its prefill would compute, the prefix cache's blocks aside: a chat's next turn
        repeats its earlier turns, which are cached, so it is short however long the conversation (a 291-token
        turn of a 7-turn chat sent 2 s after a 3,635-token prompt had its first token after 18.5-19.9 s, judged by
        its whole length; 0.7-0.9 s now). Remembered per request until the cache changes: this runs every pass
        while a long prompt is staged."""
        if len(req.prompt) <= self.prefill_chunk:
            return len(req.prompt)
        if req.uncached is None or req.uncached[0] != self.prefix.changes:
            req.uncached = (self.prefix.changes, len(req.prompt) - self.prefix.cached_tokens(req.prompt))
        return req.uncached[1]

    def _resume_aside(self) -> None:
        """The short prompt that went first has joined the batch (or failed, or was cancelled): the prompt set aside
        is staged again, just past the rows (a cancelled short prompt leaves a gap that compaction does not see)."""
        pf = self._aside
        if self._prefilling is not None or pf is None:
            return
        self._aside = None
        if pf.slot != len(self._rows):
            self.cache.move_slot(pf.slot, len(self._rows))
            pf.slot = len(self._rows)
        self._prefilling = pf

    def _start(self, req: _Request, speculative: bool) -> None:
        if speculative:
            # Speculative decoding verifies several tokens per target pass for ONE sequence: it has
            # its own one-slot cache and runs one round per worker iteration, between batched steps.
            self._spec.start(req)
        elif req.max_new == 0:
            for i in range(req.params.n):
                req.outbox.append(FinishEvent(i, "length", "", 0))
            self._finish_request(req, flush=True)
        else:
            # The prompt goes into the staging slot just past the decode rows; compaction keeps it there.
            slot = len(self._rows)
            aside = self._aside  # (set when this request overtakes a long prompt: its slots stay)
            in_use = slot if aside is None else max(slot, aside.slot + aside.req.params.n)
            self.cache.reserve(slot + req.params.n, len(req.prompt) + 1, in_use=in_use)
            self.cache.lengths[slot] = 0
            # A prefix another request computed is copied in; the prefill starts after it.
            self._prefilling = _Prefill(req, slot, self.prefix.load(req.prompt, self.cache, slot))

    def _new_cache(self) -> KVCache:
        return self.runner.new_cache(slots=self.initial_slots, capacity=self.initial_capacity, budget=self.kv_budget)

    def _slots_in_use(self) -> int:
        """Leading slots that hold K/V: the rows, then the staged prompt's and the one set aside's slots."""
        return max([len(self._rows)] + [pf.slot + pf.req.params.n for pf in (self._prefilling, self._aside) if pf is not None])

    def _room_to_step(self) -> None:
        """Grow the cache for the next decode step here, where the slots in use are known (the forward keeps every
        slot). Past the budget, a prompt not decoding yet (staged, or set aside) gives way: it goes back to the head
        of the queue, its partial prefill dropped, and waits for room as at admission; if the rows still cannot grow,
        those that reached the cache's end end with ``length`` (what a context's end does) and the rest go on. Why
        not fail the step: that failed every row of the batch."""
        rows = self._rows
        need = max(self.cache.lengths[s.slot] for s in rows) + 1
        if need <= self.cache.capacity:
            return
        try:
            self.cache.reserve(len(rows), need, in_use=self._slots_in_use())
            return
        except KVCacheFull:
            staged = [pf for pf in (self._prefilling, self._aside) if pf is not None]
        for pf in sorted(staged, key=lambda pf: pf.req.t_submit, reverse=True):  # the earlier one ends at the head
            self._waiting.appendleft(pf.req)
            if not pf.req.waited_for_room:
                pf.req.waited_for_room = True
                self.stats.kv_waits += 1
        self._prefilling = self._aside = None
        try:
            self.cache.reserve(len(rows), need, in_use=len(rows))
        except KVCacheFull as e:
            full = [s for s in rows if self.cache.lengths[s.slot] + 1 > self.cache.capacity]
            log.warning("local engine: %d sequence(s) end at %d positions: %s", len(full), self.cache.capacity, e)
            self.stats.kv_cuts += len(full)
            for s in full:
                self._emit(s, "length")
            self._compact()
            for req in {id(s.req): s.req for s in full}.values():
                req.flush()

    def _shrink_idle_cache(self) -> None:
        """Idle for ``idle_poll_s`` after long or wide requests: give the grown KV cache back."""
        if not self._rows and self._prefilling is None and self._aside is None and (self.cache.slots, self.cache.capacity) != (self.initial_slots, self.initial_capacity):
            self.cache = self._new_cache()

    def _job_due(self) -> bool:
        """Whether the first job runs (or takes its next step) in this pass.  A job not started yet starts at once: a
        plain one runs whole, as before; a step-wise one only reaches its first step.  Steps take turns with the rows
        by :meth:`_prefill_due`'s measure (the decode time owed for the last step), and with a staged long prompt,
        whose chunk goes next after a step."""
        job = self._jobs[0]
        if job.steps is None or job.future.cancelled():
            return True  # to start it, or to drop it
        if not self._rows:
            self._owed = 0.0
            return True
        pf = self._prefilling
        if self._job_went_last and pf is not None and len(pf.req.prompt) > self.prefill_chunk:
            return False
        return self._owed <= 0

    def _job_turn(self) -> None:
        """One turn of the first job: drop it if its caller cancelled it, else run it (a plain job, whole) or its next
        step (a step-wise one); its result or exception goes to its future once it ends."""
        job = self._jobs[0]
        if job.future.cancelled():  # its caller is gone (deadline, disconnect): no further step
            self.stats.cancelled += 1
            self._end_job(job)
            return
        try:
            if job.steps is None:
                out = job.fn(self.runner)
                if not isinstance(out, types.GeneratorType):
                    self._end_job(job, result=out)
                    return
                job.steps = out
                next(out)  # to its first step (nothing computed yet: argument checks)
                if not self._job_due():
                    return
            self.threads.apply(self.prefill_tuner.current)  # a forward of a prefill-sized chunk: prefill's setting
            t0 = time.perf_counter()
            try:
                tokens = job.steps.send(self._chunk_tokens(job.token_s or self._token_s))
            finally:
                spent = time.perf_counter() - t0
                self.stats.job_steps += 1
                self._job_went_last = True
                if self._rows:
                    self.stats.job_steps_interleaved += 1
                    self._owed = spent
            if tokens:
                job.token_s = spent / tokens
        except StopIteration as done:
            self._end_job(job, result=done.value)
        except Exception as e:  # noqa: BLE001 - a failed job fails its caller only
            self.stats.errors += 1
            self._end_job(job, error=e)

    def _end_job(self, job: _Job, result: Any = None, error: BaseException | None = None) -> None:
        """The first job leaves the queue; its future gets ``result`` or ``error`` unless it was cancelled."""
        self._jobs.popleft()
        if job.steps is not None:
            job.steps.close()
        if job.future.set_running_or_notify_cancel():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def _chunk_tokens(self, token_s: float) -> int:
        """Tokens for the next prefill chunk or job step: ``prefill_chunk`` while rows decode (``prefill_chunk_idle``
        otherwise), cut to about ``prefill_slice_s`` at ``token_s`` seconds per token (not below ``prefill_min_chunk_idle``
        when no rows decode), in whole prefix-cache blocks."""
        chunk, floor = (self.prefill_chunk, 0) if self._rows else (self.prefill_chunk_idle, self.prefill_min_chunk_idle)
        if token_s:
            chunk = min(chunk, max(floor, int(self.prefill_slice_s / token_s)))
        grid = self.prefix.block
        return max(grid, chunk // grid * grid)

    def _prefill_chunk(self) -> None:
        """Run the next chunk of the staged prompt; when it is complete, its n rows join the batch.

        Chunks interleave with decode steps, so a long prompt (an aggregation over six
        answers) delays the sequences already streaming by one chunk, not by its whole prefill.
        """
        pf = self._prefilling
        assert pf is not None
        req = pf.req
        chunk = self._chunk_tokens(pf.token_s or self._token_s)  # whole blocks: every chunk starts on the attention grid
        probe = self.prefill_tuner.probing
        if probe:  # a probe of 2 threads on busy cores took 6.2 s for 96 tokens (1 thread: 0.4 s)
            chunk = min(chunk, 2 * self.prefix.block)
        ids = req.prompt[pf.done : pf.done + chunk]
        # A prompt's K/V must not depend on how it was chunked (the chunk size changes with load and with the
        # time each chunk took; a cached prefix leaves a short tail): never the int8 weights, and attention on the
        # prefix cache's block grid.
        self.prefill_tuner.before_step()
        t0 = time.perf_counter()
        out = self.runner.forward(torch.tensor([ids], device=self.runner.device), self.cache, pf.slot, [pf.done],
                                  logits="last", small_weights=False, kv_grid=self.prefix.block)
        spent = time.perf_counter() - t0
        # Work in the tuner's units, so that chunks of other sizes and depths compare (a chunk is cut short when its
        # tokens are slow: prefill_slice_s): a fixed part (~20 tokens' worth: the weights read once) and tokens that
        # cost more deep in a prompt (attention over every earlier key: ~6x at position 6,000 on SmolLM2).
        self.prefill_tuner.after_step(spent, 20 + len(ids) * (1.0 + (pf.done + len(ids) / 2) / 1200))
        self.stats.prefill_threads = self.prefill_tuner.current
        if not probe:  # a probe's cost is not the setting's: it must not size the next chunks
            pf.token_s = self._token_s = spent / len(ids)
        self._job_went_last = False
        if self._rows:
            self.stats.prefill_chunks_interleaved += 1
            if len(req.prompt) > self.prefill_chunk:
                self._owed = spent
        pf.done += len(ids)
        if pf.done < len(req.prompt):
            return
        self._prefilling = None
        self.prefix.store(req.prompt, self.cache, pf.slot)  # only a completed prefill is kept
        self._start_sequences(req, pf.slot, out.logits[:, -1])

    def _prefill_due(self) -> bool:
        """Whether the staged prompt's next chunk runs in this pass.

        Why turns in equal time: a chunk of 256 tokens late in a long prompt takes ~1.2 s (SmolLM2, 2 cores, at
        position 6,000: attention over every earlier key), a decode step 15-30 ms, so with one chunk per step
        the rows decoded beside a 6,800-token prompt crawled at a token a second: a 16-token answer took 11-16 s
        instead of 0.4 s. Taking turns, each side goes at least half speed while both have work: the long prompt
        waits at most as long again as it would alone, the rows are held up for about one slice at a time. A
        prompt that fits in one chunk goes at once (it joins the batch, as an overtaking one does).
        """
        pf = self._prefilling
        if not self._rows:
            self._owed = 0.0
            return True
        return pf is None or len(pf.req.prompt) <= self.prefill_chunk or self._owed <= 0

    def _start_sequences(self, req: _Request, slot: int, last_logits: torch.Tensor) -> None:
        p = req.params
        self.stats.prefills += 1
        self.stats.prefill_tokens += len(req.prompt)  # (cached prefix tokens included: see prefix.stats)
        # Shared prefill: the n samples start from copies of one prompt KV.
        for i in range(1, p.n):
            self.cache.copy_slot(slot, slot + i)
        base_seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(62)
        bias = None
        if p.logit_bias:  # one pair of tensors for the request's rows (the ids were checked against the vocabulary at submit)
            dev = self.runner.device
            bias = (torch.tensor(list(p.logit_bias), dtype=torch.long, device=dev),
                    torch.tensor(list(p.logit_bias.values()), dtype=last_logits.dtype, device=dev))
        seqs = []
        for i in range(p.n):
            sampling = RowSampling(
                p.temperature,
                p.top_p,
                p.top_k,
                make_generator(choice_seed(base_seed, i), self.runner.device),
                repetition_penalty=p.repetition_penalty,
                presence_penalty=p.presence_penalty,
                frequency_penalty=p.frequency_penalty,
                min_p=p.min_p,
                prompt_ids=req.prompt,
                constraint=self._constraints.matcher(p.grammar) if p.grammar else None,
                min_tokens=p.min_tokens,
                held_ids=self._eos_tensor if p.min_tokens and not p.ignore_eos else None,
                bias=bias,
            )
            text = IncrementalText(self.tokenizer, p.stop, p.min_tokens)
            sampling.output_ids = text.ids  # penalties read the generated tokens as they grow
            seqs.append(_Sequence(req, i, slot + i, text, sampling))
        logits = last_logits.expand(p.n, -1)
        tokens = sample_rows(logits, [s.sampling for s in seqs])
        self._rows.extend(seqs)
        req.t_first = time.perf_counter()
        self._advance(seqs, tokens, logits)

    def _step(self) -> None:
        self._room_to_step()
        rows = self._rows
        if not rows:
            return
        self.tuner.before_step()
        t0 = time.perf_counter()
        out = self.runner.decode([s.last for s in rows], self.cache, 0, self._shared_prompts(rows))
        logits = out.logits[:, -1]
        # Cost model for comparing steps (the tuner also reads a far move of it as a change of load): weights are
        # read once per step, each row adds ~10% (packed bf16, AVX512 EPYC: 15.7 ms at 1 row, 25 at 6, 38 at 16),
        # attention grows with B x length.
        work = 1.0 + 0.1 * (len(rows) - 1) + sum(self.cache.lengths[s.slot] for s in rows) / 6000
        spent = time.perf_counter() - t0
        self.tuner.after_step(spent, work)
        self._owed -= spent
        tokens = sample_rows(logits, [s.sampling for s in rows])
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(rows)
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))
        self.stats.threads = self.tuner.current
        self._advance(list(rows), tokens, logits)

    def _shared_prompts(self, rows: list[_Sequence]) -> list[tuple[int, int, int]]:
        """The decode step's groups ``(row, count, prompt length)``: the rows of one request (consecutive, each slot
        a copy of the prompt's K/V) whose prompt is long enough that reading it once per group pays
        (``runner._attend_shared``; below ~1,000 tokens two more calls per layer cost about what they save)."""
        groups: list[tuple[int, int, int]] = []
        i = 0
        while i < len(rows):
            req, j = rows[i].req, i + 1
            while j < len(rows) and rows[j].req is req:
                j += 1
            if j - i > 1 and len(req.prompt) >= self.shared_prompt_min:
                groups.append((i, j - i, len(req.prompt)))
            i = j
        return groups

    def _token_str(self, tid: int) -> str:
        s = self._token_text.get(tid)
        if s is None:
            s = self._token_text[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
        return s

    def _token_raw(self, tid: int) -> list[int]:
        b = self._token_bytes.get(tid)
        if b is None:
            b = self._token_bytes[tid] = token_bytes(self.tokenizer, tid)
        return b

    def _lp_str(self, text: IncrementalText, tid: int) -> str:
        """A logprob entry's token string, vLLM's way: the token decoded alone, unless that is a broken multi-byte
        character (U+FFFD: a byte-fallback piece), then the text it adds after the tokens sampled so far ("" while the
        character is incomplete, the whole character from the token that completes it), so that the pieces of a
        character split over tokens add up to it instead of reading as replacement characters."""
        s = self._token_str(tid)
        return text.piece_of(tid) if "\ufffd" in s else s

    def _logprob_entry(self, text: IncrementalText, tok: int, lp: float, alts: list[tuple[int, float]]) -> LogprobEntry:
        """Computed before ``tok`` is added to ``text`` (its context is the tokens before it)."""
        return LogprobEntry(self._lp_str(text, tok), lp, [(self._lp_str(text, t), v) for t, v in alts],
                            self._token_raw(tok), [self._token_raw(t) for t, _ in alts])

    def _advance(self, seqs: list[_Sequence], tokens: list[int], logits: torch.Tensor) -> None:
        """Record one new token per sequence: text, stop/length checks, events."""
        touched: dict[int, _Request] = {}
        limit = self.runner.dims.max_positions
        for b, (seq, tok) in enumerate(zip(seqs, tokens)):
            req = seq.req
            touched[id(req)] = req
            seq.generated += 1
            seq.last = tok
            req.completion_tokens += 1
            reason = None
            lps = None
            # The EOS that ends a sequence is a generated token, as in vLLM: completion_tokens counts it and, with
            # logprobs, it has its entry (vLLM's token string: the EOS decoded alone, "<|im_end|>"; it adds no text),
            # so the logprobs have as many entries as completion_tokens says. (They disagreed: the count had the EOS,
            # the logprobs did not.)
            if req.params.logprobs:
                lp, alts = token_logprobs(logits[b], tok, req.params.top_logprobs)
                lps = [self._logprob_entry(seq.text, tok, lp, alts)]
            if self._is_eos(req, tok):
                reason = "stop"
            else:
                if seq.text.add(tok):
                    reason = "stop"
                elif seq.generated >= req.max_new or self.cache.lengths[seq.slot] + 1 >= limit:
                    reason = "length"
            self._emit(seq, reason, lps)
        # Compact before delivering: once a consumer sees its request done, its rows are gone.
        self._compact()
        for req in touched.values():
            req.flush()

    def _emit(self, seq: _Sequence, reason: str | None, lps: list[LogprobEntry] | None = None) -> None:
        """A sequence's new text (and logprobs) into its request's outbox; with ``reason``, its end."""
        req = seq.req
        if reason is not None:
            seq.text.flush()
        delta = seq.text.take(final=reason is not None)
        if delta or lps:
            req.outbox.append(TokenEvent(seq.index, delta, lps))
        if reason is not None:
            seq.finished = True
            req.outbox.append(FinishEvent(seq.index, reason, seq.text.text, seq.generated))
            req.open_choices -= 1
            if req.open_choices == 0:
                self._finish_request(req)

    def _finish_request(self, req: _Request, flush: bool = False, extra: dict[str, Any] | None = None) -> None:
        now = time.perf_counter()
        metrics = {
            "engine": "local",
            "queue_s": round((req.t_first or now) - req.t_submit, 4),
            "generation_s": round(now - req.t_submit, 4),
            **(extra or {}),
        }
        req.outbox.append(DoneEvent(len(req.prompt), req.completion_tokens, metrics))
        req.done = True
        if flush:
            req.flush()

    def _drop_cancelled(self) -> None:
        pf = self._prefilling
        if pf is not None and pf.req.cancelled:
            self._prefilling = None
            self._dropped(pf.req)
        aside = self._aside
        if aside is not None and aside.req.cancelled:
            self._aside = None
            self._dropped(aside.req)
        dropped = {}
        for s in self._rows:
            if s.req.cancelled and not s.finished:
                s.finished = True
                dropped[id(s.req)] = s.req
        for req in dropped.values():
            self._dropped(req)
        if dropped:
            self._compact()

    def _dropped(self, req: _Request) -> None:
        """The one place a cancelled request is let go (queued, staged, decoding or speculative)."""
        if not req.done:
            self.stats.cancelled += 1
            req.done = True

    def _is_eos(self, req: _Request, tok: int) -> bool:
        """The one end-of-sequence rule for batched and speculative decoding (stop strings: IncrementalText)."""
        return tok in self.eos_ids and not req.params.ignore_eos

    def _compact(self, force: bool = False) -> None:
        """Remove finished rows; move the rest down so they occupy slots 0..B-1 in order (``force``:
        check the layout even when no row finished, after a failure)."""
        if not force and not any(s.finished for s in self._rows):
            return
        keep = [s for s in self._rows if not s.finished]
        for i, s in enumerate(keep):
            if s.slot != i:  # s.slot > i and slot i is already vacated
                self.cache.move_slot(s.slot, i)
                s.slot = i
        self._rows = keep
        pf = self._prefilling
        if pf is not None and pf.slot != len(keep):  # the staged prompt follows the rows down
            self.cache.move_slot(pf.slot, len(keep))
            pf.slot = len(keep)
        aside = self._aside  # ... and one set aside stays just past the staged prompt's rows-to-be
        if aside is not None:
            at = len(keep) + (pf.req.params.n if pf is not None else 0)
            if aside.slot != at:
                self.cache.move_slot(aside.slot, at)
                aside.slot = at

    def _fail(self, reqs: list[_Request], err: BaseException) -> None:
        """Fail exactly ``reqs``: an error event each; their rows, staged prompt, speculative runs
        and queue places are dropped (rows are compacted away by the caller)."""
        ids = {id(r) for r in reqs}
        if not ids:
            return
        for s in self._rows:
            if id(s.req) in ids:
                s.finished = True
        self._spec.drop(ids)
        if self._prefilling is not None and id(self._prefilling.req) in ids:
            self._prefilling = None
        if self._aside is not None and id(self._aside.req) in ids:
            self._aside = None
        self._waiting = deque(r for r in self._waiting if id(r) not in ids)
        for r in reqs:
            if r.done:  # finished (or cancelled) before the failure: deliver what it has
                r.flush()
            else:
                self.stats.errors += 1
                r.done = True
                r.outbox = [ErrorEvent(err)]
                r.flush()


class SpeculativeLane:
    """Speculative requests (``n == 1`` with a ``speculative`` config): each verifies several tokens per
    target pass for one sequence, in its own one-slot cache, as a round generator; the engine advances
    every run by one round per worker iteration, between its batched steps.  Tokens go through the
    engine's EOS rule and the stop-string/text handling of a normal step."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.runs: list[_SpecRun] = []

    def __len__(self) -> int:
        return len(self.runs)

    def requests(self) -> list[_Request]:
        return [run.req for run in self.runs]

    def start(self, req: _Request) -> None:
        from .specdec.serve import speculative_session

        eng, p = self.engine, req.params
        req.t_first = time.perf_counter()
        rounds = speculative_session(
            eng.runner, req.prompt, p.speculative, temperature=p.temperature, top_p=p.top_p, max_tokens=req.max_new,
            seed=p.seed, stop_ids=frozenset() if p.ignore_eos else frozenset(eng.eos_ids),
            prefill_chunk=eng.prefill_chunk,  # a chunk per round: the batched rows keep stepping through a long prompt
            prefix=eng.prefix,  # same numerics as the engine's prefill: a hit is bit-identical to computing it
        )
        self.runs.append(_SpecRun(req, rounds, IncrementalText(eng.tokenizer, p.stop)))

    def drop(self, ids: set[int]) -> None:
        """Close and remove the runs of these requests (by ``id``)."""
        for run in [run for run in self.runs if id(run.req) in ids]:
            self.runs.remove(run)
            run.rounds.close()

    def step(self) -> None:
        """One round of every run, flushed to its sink; a cancel or a matched stop string ends the
        request after the round in flight; a failed round fails its request only."""
        eng = self.engine
        for run in list(self.runs):
            req = run.req
            if req.cancelled:
                self.drop({id(req)})
                eng._dropped(req)
                continue
            try:
                tokens = run.rounds.send(run.halt)
            except StopIteration as done:
                self.runs.remove(run)
                self._finish(run, done.value[1])
                continue
            except Exception as e:  # a bad speculative config or a failed round fails its request only
                log.warning("speculative generation failed: %s", e)
                eng._fail([req], e)
                continue
            ended = False
            for tok in tokens:
                run.n += 1
                if eng._is_eos(req, tok) or run.text.add(tok):
                    run.reason, ended = "stop", True
                    break
            delta = run.text.take()
            if delta:
                req.outbox.append(TokenEvent(0, delta))
                req.flush()
            run.halt = ended

    def _finish(self, run: _SpecRun, spec_metrics: dict[str, Any]) -> None:
        req = run.req
        run.text.flush()
        delta = run.text.take(final=True)
        if delta:
            req.outbox.append(TokenEvent(0, delta))
        req.completion_tokens = run.n
        self.engine.stats.decode_tokens += run.n
        req.outbox.append(FinishEvent(0, run.reason, run.text.text, run.n))
        self.engine._finish_request(req, flush=True, extra=spec_metrics)
