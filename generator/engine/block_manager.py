"""Free-block accounting for the paged KV cache, and reuse of full prefix blocks across requests.

A sequence's block table lists the pool blocks holding its tokens in order. Blocks are reference counted: a
full block whose contents are known (its tokens and every token before it, summed up in a chained hash) is
registered under that hash when `enable_reuse` is on, and a later sequence starting with the same tokens
takes it instead of recomputing it. A block whose last user is gone goes back to the free list but keeps its
hash until the block is handed out again (least recently freed first), so a prefix stays reusable as long as
memory allows. Block 0 is the padding block (see kv_cache.py) and is never handed out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """The identity of a full block: its tokens and (through `parent`) every token before them."""
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Hands out pool blocks 1..num_blocks-1 to block tables and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_reuse: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError("the pool needs at least one block besides the padding block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_reuse = enable_reuse
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}           # block -> hash of its (full) contents
        self._block_of: dict[int, int] = {}          # hash -> block
        self._tokens_of: dict[int, tuple[int, ...]] = {}  # block -> its tokens (to rule out hash collisions)
        # free blocks, least recently freed first; a value is unused (an ordered set)
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.num_reused = 0  # blocks taken from the prefix cache so far (a statistic)

    # accounting --------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Blocks that can ever be handed out."""
        return self.num_blocks - 1

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    # prefix reuse ------------------------------------------------------------------------------------------
    def _cached_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Blocks already holding the longest run of full blocks of `tokens`, leaving at least the last token
        to compute (its logits are needed)."""
        if not self.enable_reuse:
            return []
        size = self.block_size
        found: list[int] = []
        parent: int | None = None
        for start in range(0, (len(tokens) - 1) // size * size, size):
            chunk = tuple(tokens[start:start + size])
            parent = block_hash(parent, chunk)
            block = self._block_of.get(parent)
            if block is None or self._tokens_of.get(block) != chunk:
                break
            found.append(block)
        return found

    def can_admit(self, tokens: Sequence[int], reserve: int = 0) -> bool:
        """Whether a new sequence of `tokens` fits next to `reserve` blocks kept for running sequences."""
        cached = self._cached_prefix(tokens)
        revived = sum(1 for b in cached if self._refs[b] == 0)  # taken from the free list by reuse
        needed = self.blocks_for(len(tokens)) - len(cached) + revived
        return needed + reserve <= self.num_free

    def take_prefix(self, tokens: Sequence[int]) -> list[int]:
        """A new block table starting with the cached prefix blocks of `tokens` (each gets one more user)."""
        cached = self._cached_prefix(tokens)
        for block in cached:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        self.num_reused += len(cached)
        return list(cached)

    def register_full_blocks(self, table: list[int], tokens: Callable[[int, int], list[int]], num_computed: int,
                             hashes: list[int]) -> None:
        """Record the hashes of the blocks of `table` now full of computed tokens (`tokens(start, end)` reads
        the sequence); `hashes` holds the sequence's block hashes so far and is extended in place."""
        if not self.enable_reuse:
            return
        size = self.block_size
        for index in range(len(hashes), min(num_computed // size, len(table))):
            chunk = tuple(tokens(index * size, (index + 1) * size))
            digest = block_hash(hashes[-1] if hashes else None, chunk)
            hashes.append(digest)
            block = table[index]
            if digest in self._block_of:
                continue  # a cached prefix block, or the same contents in another block: keep that one
            self._forget(block)
            self._hash_of[block] = digest
            self._block_of[digest] = block
            self._tokens_of[block] = chunk

    def _forget(self, block: int) -> None:
        old = self._hash_of.pop(block, None)
        if old is not None and self._block_of.get(old) == block:
            del self._block_of[old]
        self._tokens_of.pop(block, None)

    # allocation ----------------------------------------------------------------------------------------------
    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append free blocks to `table` until it holds `num_tokens`; False (table unchanged) if too few."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.num_free:
            return False
        for _ in range(missing):
            block, _ = self._free.popitem(last=False)
            self._forget(block)  # its old contents are about to be overwritten
            self._refs[block] = 1
            table.append(block)
        return True

    def release(self, table: list[int]) -> None:
        """Drop one user of every block of `table`; the tail goes to the free list first, so it is handed out
        again before the head (the part other prompts are likelier to share)."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
            elif self._refs[block] < 0:
                raise AssertionError(f"block {block} released more often than taken")
        table.clear()
