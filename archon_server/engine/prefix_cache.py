"""Prefix caching across requests: K/V of prompt blocks kept after a prefill, reused by later prompts.

Why: the prompts an ensemble sends repeat long prefixes — every judge prompt of a benchmark opens
with the same system prompt and template, a multi-turn question's second turn repeats the first,
and the fuser's prompt repeats the question its samples answered.  K/V at position ``p`` depends
only on tokens ``0..p``, so a prefix computed once can be copied into a new request's slot and the
prefill starts after it.

Design (vLLM's automatic prefix caching, on this engine's slot cache):

* A prompt is cut into blocks of ``block`` tokens; block ``i`` is keyed by *(its parent block's
  id, its tokens)*.  The dict compares keys exactly, so two prompts share a block only when every
  token up to its end is equal — no digest collision can hand one request another's K/V.
* Blocks are **copies** owned by this cache, never views of a slot: a slot that is compacted,
  reused or reset (a cancelled or failed request) cannot change a cached block.  Only a prefill
  that completed inserts blocks, so a request cancelled or failed mid-prompt leaves nothing here.
* Eviction is LRU by bytes.  A lookup or insert touches a chain from its deepest block up to the
  root, so a parent is always more recent than its children and the least recent block is always
  a leaf: eviction never strands a reachable child behind a missing parent.
* The blocks live in **one pool** of ``budget / block bytes`` rows, allocated (untouched, so not yet
  resident) at the first store, with a free list; a block is a row index.  Why not one tensor per
  block: thousands of ~1 MB allocations freed in LRU order fragmented the allocator, and the process
  kept ~1.7 GB for a 256 MB budget after a soak of long prompts; a pool holds exactly the budget.
  A hit is copied into the slot block by block (no concatenated temporary either).

Everything runs on the engine's worker thread (no locks); the counters are read from any thread.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .runner import PREFILL_GRID, KVCache

__all__ = ["PrefixCache", "PrefixStats"]


@dataclass
class PrefixStats:
    """Counters since start: ``hit_tokens / query_tokens`` is the hit rate."""

    queries: int = 0  # prompts looked up
    query_tokens: int = 0  # tokens those prompts could have reused (each prompt's length - 1)
    hit_tokens: int = 0  # tokens whose K/V came from the cache
    inserted_blocks: int = 0
    evicted_blocks: int = 0
    blocks: int = 0  # held now
    bytes: int = 0  # held now

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass
class _Block:
    id: int
    key: tuple[int, tuple[int, ...]]
    row: int  # index into the pool's block dimension


class PrefixCache:
    """Exact-match prompt-prefix K/V blocks with an LRU byte budget (``budget_bytes`` 0 disables it)."""

    def __init__(self, budget_bytes: int, block: int = PREFILL_GRID):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.budget_bytes = max(0, int(budget_bytes))
        self.block = block
        self.stats = PrefixStats()
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()
        self._next_id = 1  # 0 is the root (the empty prefix); ids are never reused
        self._k: torch.Tensor | None = None  # the pool: [layers, rows, kv_heads, block, head_dim]
        self._v: torch.Tensor | None = None
        self._free: list[int] = []  # pool rows not holding a block
        self._block_bytes = 0
        self.changes = 0  # blocks inserted, evicted or dropped: what a cached_tokens() answer was given at

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _chain(self, prompt: list[int], limit: int) -> list[_Block]:
        """The cached blocks that cover ``prompt[:n]`` for the largest ``n <= limit`` (whole blocks)."""
        out: list[_Block] = []
        parent, b = 0, self.block
        for i in range(limit // b):
            blk = self._blocks.get((parent, tuple(prompt[i * b : (i + 1) * b])))
            if blk is None:
                break
            out.append(blk)
            parent = blk.id
        return out

    def cached_tokens(self, prompt: list[int]) -> int:
        """How many leading tokens of ``prompt`` a :meth:`load` would copy now (no counters, no LRU touch): the
        scheduler asks it to judge how much of a queued prompt is left to prefill."""
        return len(self._chain(prompt, len(prompt) - 1)) * self.block if self.enabled and self._blocks else 0

    def _touch(self, chain: list[_Block]) -> None:
        for blk in reversed(chain):  # deepest first, root last: parents stay more recent than children
            self._blocks.move_to_end(blk.key)

    @torch.inference_mode()
    def load(self, prompt: list[int], cache: KVCache, slot: int) -> int:
        """Copy the longest cached prefix of ``prompt`` into ``slot`` (from position 0); returns its length.

        At least the prompt's last token is left to compute: its logits start the generation.
        """
        if not self.enabled:
            return 0
        limit = len(prompt) - 1
        self.stats.queries += 1
        self.stats.query_tokens += max(0, limit)
        chain = self._chain(prompt, limit)
        if not chain:
            return 0
        n = len(chain) * self.block
        cache.reserve(slot + 1, len(prompt) + 1)
        assert self._k is not None and self._v is not None  # a chain exists only after a store made the pool
        b = self.block
        for i, blk in enumerate(chain):
            cache.k[:, slot, :, i * b : (i + 1) * b] = self._k[:, blk.row]
            cache.v[:, slot, :, i * b : (i + 1) * b] = self._v[:, blk.row]
        cache.lengths[slot] = n
        self._touch(chain)
        self.stats.hit_tokens += n
        return n

    @torch.inference_mode()
    def store(self, prompt: list[int], cache: KVCache, slot: int) -> None:
        """Keep the whole blocks of ``prompt``, whose K/V ``slot`` now holds (a completed prefill)."""
        if not self.enabled or not self._pool_for(cache):
            return
        assert self._k is not None and self._v is not None
        b = self.block
        full = min(len(prompt), cache.lengths[slot]) // b
        chain = self._chain(prompt, full * b)
        self._touch(chain)  # the prefix this prompt extends is the most recent: not what an insert evicts
        parent = chain[-1].id if chain else 0
        mine = {blk.id for blk in chain}
        for i in range(len(chain), full):
            row = self._take_row(mine)
            if row is None:  # the budget is this prompt's own prefix: keep what fits
                break
            self._k[:, row] = cache.k[:, slot, :, i * b : (i + 1) * b]
            self._v[:, row] = cache.v[:, slot, :, i * b : (i + 1) * b]
            key = (parent, tuple(prompt[i * b : (i + 1) * b]))
            blk = _Block(self._next_id, key, row)
            self._next_id += 1
            self._blocks[key] = blk
            self.stats.inserted_blocks += 1
            self.changes += 1
            chain.append(blk)
            mine.add(blk.id)
            parent = blk.id
        self._touch(chain)
        self.stats.blocks = len(self._blocks)
        self.stats.bytes = self.stats.blocks * self._block_bytes

    def _pool_for(self, cache: KVCache) -> bool:
        """Allocate the pool for ``cache``'s layout (once); False when the budget holds no block."""
        d = cache.dims
        shape = (d.layers, d.kv_heads, self.block, d.head_dim)
        if self._k is not None and self._k.dtype == cache.dtype and self._k.device == cache.device \
                and (self._k.shape[0], *self._k.shape[2:]) == shape:
            return True
        self.clear()
        self._block_bytes = 2 * d.layers * d.kv_heads * self.block * d.head_dim * cache.k.element_size()
        rows = self.budget_bytes // self._block_bytes
        if rows < 1:
            return False
        pool = (d.layers, rows, d.kv_heads, self.block, d.head_dim)
        # empty, not zeros: pages become resident only as blocks are written, up to the budget
        self._k = torch.empty(pool, dtype=cache.dtype, device=cache.device)
        self._v = torch.empty(pool, dtype=cache.dtype, device=cache.device)
        self._free = list(range(rows - 1, -1, -1))
        return True

    def _take_row(self, keep: set[int]) -> int | None:
        """A free pool row, evicting the least recent block (a leaf) if none is free; None if that is in ``keep``."""
        if self._free:
            return self._free.pop()
        if not self._blocks:
            return None
        key, blk = next(iter(self._blocks.items()))
        if blk.id in keep:
            return None
        del self._blocks[key]
        self.stats.evicted_blocks += 1
        self.changes += 1
        return blk.row

    def clear(self) -> None:
        """Drop every block and the pool's memory (after an engine failure memory may be short)."""
        self._blocks.clear()
        self.changes += 1
        self._k = self._v = None
        self._free = []
        self.stats.bytes = self.stats.blocks = 0
