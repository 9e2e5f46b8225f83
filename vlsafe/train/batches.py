"""Which examples each process sees at each step: a pure function of (seed, step), so resuming needs no state.

Epoch e is a permutation of the records drawn from a generator seeded with (seed, e). Optimizer step s takes the
next `batch_size` examples of that order (an incomplete tail of an epoch is dropped, so every step has the same
global batch) and deals them out as `grad_accum` micro-batches to each of the `world` processes. The global batch
of a step is therefore the same on one process or eight, with or without accumulation: only how it is split
changes, and the token-weighted loss (stages.sft_loss) makes the split not matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import torch

from vlsafe.errors import VlsafeError


@dataclass(frozen=True)
class BatchPlan:
    n_records: int
    batch_size: int
    grad_accum: int
    world: int
    seed: int

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
        order = _permutation(self.n_records, self.seed, epoch)
        start = position * self.batch_size
        global_batch = order[start:start + self.batch_size]
        m = self.micro_batch
        # micro-batch k of rank r is slice (k * world + r): the processes cover each accumulation round together
        return [global_batch[(k * self.world + rank) * m:(k * self.world + rank + 1) * m]
                for k in range(self.grad_accum)]


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
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       collate_fn=partial(_collate, dataset.formatter, dataset.collate))


def _collate(formatter, collate, batch):
    if collate is not None:
        return collate(formatter, batch)
    return formatter.collate(batch, "right")  # right padding: training reads every position
