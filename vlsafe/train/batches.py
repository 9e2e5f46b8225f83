"""Which examples each process sees at each step: a pure function of (seed, step), so resuming needs no state.

Epoch e is a permutation of the records drawn from a generator seeded with (seed, e). Optimizer step s takes the
next `batch_size` examples of that order (an incomplete tail of an epoch is dropped, so every step has the same
global batch) and deals them out as `grad_accum` micro-batches to each of the `world` processes. The global batch
of a step is therefore the same on one process or eight, with or without accumulation: only how it is split
changes, and the token-weighted loss (stages.sft_loss) makes the split not matter.

Length grouping (`lengths` given): the epoch's order is cut into windows of GROUP_BATCHES batches, each window
sorted by record length and cut into batches, and the batches of the epoch then shuffled (seeded by (seed, epoch)
too). A batch then holds records of similar length, so padding is a small share, and every record still appears
once per epoch at a place that depends only on (seed, epoch). Within a step, micro-batches are cut from the
length-sorted batch, so they are uniform too. Lengths are a cheap proxy (characters, plus image tokens), computed
from the records alone: no tokenizing of the whole data set before step 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache, partial

import torch

from vlsafe.errors import VlsafeError

GROUP_BATCHES = 32  # batches per length-sorting window: large enough to find look-alikes, small enough to mix
CHARS_PER_TOKEN = 4


def record_length(record, image_tokens: int = 0) -> int:
    """A record's length in characters (an image counts as its tokens): conversations and preference pairs."""
    if hasattr(record, "turns"):
        text = sum(len(turn.content) for turn in record.turns)
    else:  # a preference pair: the longer of its two conversations is what its rows pad to
        text = len(record.prompt) + max(len(record.chosen), len(record.rejected))
    return text + (CHARS_PER_TOKEN * image_tokens if getattr(record, "image", None) else 0)


@dataclass(frozen=True)
class BatchPlan:
    n_records: int
    batch_size: int
    grad_accum: int
    world: int
    seed: int
    lengths: tuple[int, ...] | None = None  # per record: group batches by length; None: plain shuffled order
    _epochs: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # epoch -> its batches

    def __post_init__(self):
        if self.batch_size % (self.grad_accum * self.world):
            raise VlsafeError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum} x "
                              f"{self.world} process(es); choose a batch_size that is")
        if self.n_records < self.batch_size:
            raise VlsafeError(f"the data has {self.n_records} records, fewer than batch_size {self.batch_size}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.grad_accum * self.world)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_records // self.batch_size

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after `step` optimizer steps (for logs)."""
        return step / self.steps_per_epoch

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Record indices of the `grad_accum` micro-batches process `rank` runs at optimizer step `step` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        global_batch = self.epoch_batches(epoch)[position]
        m = self.micro_batch
        # micro-batch k of rank r is slice (k * world + r): the processes cover each accumulation round together
        return [global_batch[(k * self.world + rank) * m:(k * self.world + rank + 1) * m]
                for k in range(self.grad_accum)]


    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of an epoch, in step order."""
        if epoch not in self._epochs:
            self._epochs.clear()  # steps run in epoch order: one epoch at a time is enough
            self._epochs[epoch] = _epoch_batches(self.n_records, self.batch_size, self.seed, epoch, self.lengths)
        return self._epochs[epoch]


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: tuple[int, ...] | None) -> list:
    usable = n // batch_size * batch_size  # the incomplete tail of the permutation is dropped
    order = _permutation(n, seed, epoch)[:usable]
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, usable, batch_size)]
    window = batch_size * GROUP_BATCHES
    grouped = []
    for start in range(0, usable, window):
        # longest first; ties keep their shuffled order (sorted is stable)
        grouped += sorted(order[start:start + window], key=lambda i: -lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, usable, batch_size)]
    shuffle = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 500_009)
    return [batches[i] for i in torch.randperm(len(batches), generator=shuffle).tolist()]


@lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class EncodedRecords(torch.utils.data.Dataset):
    """Records encoded on demand (tokenized, labels masked) so a 665K-record set starts training at once."""

    def __init__(self, records: list, formatter, encode=None, collate=None):
        self.records = records
        self.formatter = formatter
        self.encode = encode  # (formatter, record) -> item; a stage's own (DPO pairs), else a conversation's
        self.collate = collate  # (formatter, items) -> batch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        if self.encode is not None:
            return self.encode(self.formatter, self.records[index])
        return self.formatter.encode_conversation(self.records[index])


def micro_batch_loader(dataset: EncodedRecords, plan: BatchPlan, rank: int, start_step: int, total_steps: int,
                       num_workers: int = 0):
    """Yields the collated micro-batches of this process from `start_step` on, in order (workers keep it)."""
    batches = [indices for step in range(start_step, total_steps) for indices in plan.micro_batches(step, rank)]
    # a generator of its own: starting an iterator draws a worker seed, which from the global generator would
    # shift the dropout draws of a resumed run (whose iterator starts after the restored RNG state) by one
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       collate_fn=partial(_collate, dataset.formatter, dataset.collate),
                                       generator=torch.Generator().manual_seed(start_step))


def _collate(formatter, collate, batch):
    if collate is not None:
        return collate(formatter, batch)
    return formatter.collate(batch, "right")  # right padding: training reads every position
