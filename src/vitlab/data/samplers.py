"""Samplers that make data order and augmentation a function of (seed, epoch, position).

Lightning's default (a `RandomSampler`, or a `DistributedSampler` it swaps in) draws
the order from the global RNG and cannot restart mid-epoch, and random augmentation
draws from whatever RNG state the process happens to be in. A run resumed from a
mid-epoch checkpoint would then see other batches than the uninterrupted run.
Here instead:

- `EpochShuffleSampler` draws epoch `e`'s permutation from its own generator seeded
  with `(seed, e)`, gives rank `r` of `w` the positions `r, r + w, r + 2w, ...` (so
  a step of `w` devices sees the same samples as one device with a `w`-times larger
  batch), and can start at a position: a resumed epoch skips what was trained.
- Each index comes with a sample seed made of `(seed, epoch, position)`;
  `SeededDataset` runs the dataset's transform under that seed and `seeded_collate`
  runs a batch-level augmentation under its first sample's seed, both in a forked
  RNG, so augmentation is the same whether a batch is drawn in the main process or a
  worker, now or after a restart, and the global RNG is left to the model (dropout).
- `ShardSampler` gives val/test ranks disjoint shards that together hold every
  sample exactly once: no padding, so DDP metrics equal single-process metrics.

`ResumableDataLoader` saves the training position in Lightning checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

_MASK = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """A 64-bit mixing function (SplitMix64's finaliser): nearby inputs, unrelated outputs."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run the block under `seed` on the CPU generator, then give the caller its state back.

    What `torch.random.fork_rng(devices=[])` + `torch.manual_seed` do, without touching
    the accelerators' generators, which makes it far cheaper; it runs once per sample.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The RNG seed of the sample at `position` of epoch `epoch`'s permutation
    (position -1 seeds the permutation itself)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ (position & _MASK))


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Shuffled training order, one rank's share, resumable mid-epoch.

    Yields `(dataset index, sample seed)`. Every rank must get the same `seed`.
    The tail of the permutation that does not split evenly over the ranks is left
    out, so every rank runs the same number of steps (DDP needs that).

    Attributes:
        num_samples: size of the dataset.
        seed: base of every epoch's permutation and of the sample seeds.
        rank: this process's rank in `[0, world_size)`.
        world_size: number of processes sharing the data.
        epoch: set by Lightning before each epoch (`set_epoch`).
        start: position in this rank's share where the next epoch `start_epoch`
            begins (a resumed epoch); 0 otherwise.
    """

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self.start_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, position: int) -> None:
        """Begin epoch `epoch` at `position` of this rank's share instead of at 0."""
        self.start_epoch, self.start = epoch, position

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        positions = range(self.rank, len(self) * self.world_size, self.world_size)
        first = self.start if self.epoch == self.start_epoch else 0
        self.start = 0
        for position in positions[first:]:
            yield order[position], sample_seed(self.seed, self.epoch, position)


class ShardSampler(Sampler[int]):
    """Rank `rank`'s shard `rank, rank + w, ...` of `range(num_samples)`, unpadded."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class SeededDataset(Dataset):
    """`dataset[index]` computed under `torch.manual_seed(sample seed)`, returned with the seed.

    The fork leaves the caller's RNG untouched, so drawing batches ahead (Lightning
    prefetches one) changes nothing for the model.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, seed = key
        with _seeded(seed):
            return self.dataset[index], seed


def seeded_collate(
    samples: Sequence[tuple[Any, int]],
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Any:
    """Collate `SeededDataset` samples with `collate_fn`, under the first sample's seed."""
    items = [item for item, _ in samples]
    with _seeded(samples[0][1]):
        return (collate_fn or default_collate)(items)


class ResumableDataLoader(DataLoader):
    """A training DataLoader over an `EpochShuffleSampler` that knows its epoch and position.

    Lightning saves `state_dict()` in every checkpoint (and `ImageDataModule` saves
    it again, because Lightning restores loader states only if nothing built the
    loader before the restore, and `trainer.estimated_stepping_batches` does).
    `load_state_dict()` makes the next epoch of that number start where the
    checkpoint left it. The position is counted in trained batches of the epoch
    (`trained_batches()`, from the trainer, which counts on from the restored
    number), not in batches drawn, because loaders and workers draw ahead.
    """

    sampler: EpochShuffleSampler

    def __init__(
        self,
        *args: Any,
        current_epoch: Callable[[], int],
        trained_batches: Callable[[], int],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.current_epoch = current_epoch
        self.trained_batches = trained_batches

    def __iter__(self) -> Iterator[Any]:
        # Lightning's `set_epoch` passes the number of epochs the loop has *processed*,
        # which counts an interrupted epoch as done; the number of completed epochs
        # names the epoch being trained both in a fresh and in a resumed run.
        self.sampler.set_epoch(self.current_epoch())
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        position = self.trained_batches() * (self.batch_size or 1)
        return {"epoch": self.current_epoch(), "position": position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.sampler.resume_at(state_dict["epoch"], state_dict["position"])
