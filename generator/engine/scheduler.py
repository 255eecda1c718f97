"""The scheduler: which sequences run in the next forward, and how many of their tokens, under a token budget.

Every sequence is `prompt + output` tokens of which `num_computed` have their K/V in the pool; a step computes
the next `count` of them. A decode is `count == 1`; a prompt (or a preempted sequence being recomputed) is
computed in chunks. Each step (as TensorRT-LLM's chunked context and vLLM's v1 scheduler do):
1. running sequences first, decodes before unfinished prefills, each within what is left of `max_num_tokens`;
   when the pool has no block for one, the NEWEST running sequence is preempted: its blocks go back and it
   waits at the head of the queue to be recomputed from its tokens (it continues where it stopped; nothing
   it already returned is returned again);
2. then queued sequences, oldest first, while the batch has room (`max_batch_size`), the budget has tokens
   and the pool has blocks for the whole sequence (less its cached prefix) next to a small reserve for the
   running sequences' growth. With `prefill_wait_steps` W > 0 (vLLM's old `scheduler_delay_factor` idea) new
   prompts join running sequences only once the oldest has waited W steps, so several join in one mixed step
   and the others stay pure decode steps (CUDA-graph replays); TTFT grows by at most W steps.
A sequence is sampled after the step that computes its last token.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

from generator.engine.block_manager import BlockManager
from generator.errors import ConfigError

PREFILL_WAIT_ENV = "GEN_REPO_PREFILL_WAIT_STEPS"


def parse_prefill_wait_steps(value: str | int | None, source: str = "prefill_wait_steps") -> int:
    """`prefill_wait_steps` from an argument, a config parameter or the environment (None: $GEN_REPO_PREFILL_WAIT_STEPS,
    else 0); ConfigError naming `source` for anything but a whole number >= 0."""
    if value is None:
        value, source = os.environ.get(PREFILL_WAIT_ENV, "0"), PREFILL_WAIT_ENV
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"{source} must be a whole number >= 0, got {value!r}")
    return int(text)


@dataclass(eq=False)
class Sequence:
    """A request's tokens as the scheduler sees them (`output` is shared with the sampling state)."""

    prompt: list[int]
    output: list[int]
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_hashes: list[int] = field(default_factory=list)  # of its full blocks, in order (prefix reuse)
    preemptions: int = 0
    queued_at: int = 0  # the scheduler step it was added at

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int = 0, end: int | None = None) -> list[int]:
        end = len(self) if end is None else end
        prompt = len(self.prompt)
        if end <= prompt:
            return self.prompt[start:end]
        if start >= prompt:
            return self.output[start - prompt:end - prompt]
        return self.prompt[start:] + self.output[:end - prompt]


@dataclass(frozen=True)
class Scheduled:
    """`count` tokens of `sequence`, from its position `start`."""

    sequence: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """True when this chunk ends at the sequence's last token: its logits give the next token."""
        return self.start + self.count == len(self.sequence)


class Scheduler:
    """Waiting and running sequences over one `BlockManager`."""

    def __init__(self, blocks: BlockManager, max_batch_size: int, max_num_tokens: int,
                 prefill_wait_steps: int = 0) -> None:
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        # every running sequence must be able to decode in one step
        self.max_num_tokens = max(max_num_tokens, max_batch_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserve = max(1, blocks.capacity // 100)  # blocks kept free at admission for running growth
        self.num_preemptions = 0
        self.prefill_wait_steps = prefill_wait_steps
        self.steps = 0  # calls of schedule()

    def add(self, sequence: Sequence) -> None:
        sequence.queued_at = self.steps
        self.waiting.append(sequence)

    def remove(self, sequence: Sequence) -> None:
        """Take a finished or cancelled sequence out, giving its blocks back."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence in self.waiting:
            self.waiting.remove(sequence)
        self.blocks.release(sequence.block_table)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, sequence: Sequence) -> None:
        self.blocks.release(sequence.block_table)
        sequence.num_computed = 0
        sequence.block_hashes.clear()
        sequence.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(sequence)

    def _admitting(self) -> bool:
        """Whether waiting sequences may join this step (see `prefill_wait_steps`). An idle engine and a
        preempted sequence (recomputing what it had) never wait."""
        if not self.prefill_wait_steps or not self.running or not self.waiting:
            return True
        head = self.waiting[0]
        return head.preemptions > 0 or self.steps - head.queued_at >= self.prefill_wait_steps

    def schedule(self) -> list[Scheduled]:
        """The next step's work: decodes first, then prefill chunks (the order the model runner wants)."""
        budget = self.max_num_tokens
        chosen: dict[Sequence, Scheduled] = {}
        preempted: set[Sequence] = set()
        # decodes first so a long prefill chunk never takes their budget
        order = sorted(self.running, key=lambda s: len(s) - s.num_computed > 1)
        for sequence in order:
            if sequence in preempted:
                continue  # preempted for an earlier one this step
            count = min(len(sequence) - sequence.num_computed, budget)
            if count <= 0:
                continue
            while not self.blocks.grow(sequence.block_table, sequence.num_computed + count):
                victim = self.running.pop()
                undone = chosen.pop(victim, None)
                if undone is not None:
                    budget += undone.count
                self._preempt(victim)
                preempted.add(victim)
                if victim is sequence:
                    break
            else:
                chosen[sequence] = Scheduled(sequence, sequence.num_computed, count)
                budget -= count
        admitting = self._admitting()
        self.steps += 1
        while admitting and not preempted and self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            sequence = self.waiting[0]
            if not sequence.block_table:
                tokens = sequence.tokens()
                if not self.blocks.can_admit(tokens, self.reserve if self.running else 0):
                    break
                sequence.block_table = self.blocks.take_prefix(tokens)
                sequence.num_computed = len(sequence.block_table) * self.blocks.block_size
            count = min(len(sequence) - sequence.num_computed, budget)
            if not self.blocks.grow(sequence.block_table, sequence.num_computed + count):
                break  # keeps its prefix blocks and stays first in line
            self.waiting.popleft()
            self.running.append(sequence)
            chosen[sequence] = Scheduled(sequence, sequence.num_computed, count)
            budget -= count
        work = list(chosen.values())
        work.sort(key=lambda s: s.count > 1)  # stable: decodes first
        return work

    def computed(self, work: list[Scheduled]) -> None:
        """Record that the step ran: the chunks' K/V are in the pool (full blocks become reusable)."""
        for item in work:
            sequence = item.sequence
            if sequence.block_table and sequence.num_computed == item.start:
                sequence.num_computed = item.start + item.count
                if self.blocks.enable_reuse:
                    self.blocks.register_full_blocks(sequence.block_table, sequence.tokens, sequence.num_computed,
                                                     sequence.block_hashes)
