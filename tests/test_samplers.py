"""`vitlab.data.samplers`: order and augmentation as a function of (seed, epoch, position)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from vitlab.data.samplers import (
    EpochShuffleSampler,
    ResumableDataLoader,
    SeededDataset,
    ShardSampler,
    sample_seed,
    seeded_collate,
)


class NoisyIndex(Dataset):
    """Sample i is (i, a random number from the global RNG): a stand-in for augmentation."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, torch.rand(()).item()


def _indices(sampler: EpochShuffleSampler) -> list[int]:
    return [index for index, _ in sampler]


def test_an_epoch_is_a_permutation_that_depends_on_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=1)
    first = _indices(sampler)
    assert sorted(first) == list(range(50))
    assert _indices(sampler) == first
    sampler.set_epoch(1)
    assert _indices(sampler) != first
    assert _indices(EpochShuffleSampler(50, seed=2)) != first


def test_the_order_does_not_depend_on_the_global_rng():
    torch.manual_seed(0)
    a = _indices(EpochShuffleSampler(50, seed=1))
    torch.manual_seed(1)
    assert _indices(EpochShuffleSampler(50, seed=1)) == a


def test_rank_shards_interleave_the_single_process_order_and_are_equally_long():
    whole = _indices(EpochShuffleSampler(51, seed=3))
    shards = [_indices(EpochShuffleSampler(51, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 25
    assert shards[0] == whole[0:50:2] and shards[1] == whole[1:50:2]


def test_resume_at_skips_the_trained_positions_of_that_epoch_only():
    sampler = EpochShuffleSampler(50, seed=4)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.resume_at(epoch=2, position=20)
    assert list(sampler) == whole[20:]
    assert list(sampler) == whole, "the next pass starts at 0 again"
    sampler.resume_at(epoch=3, position=20)
    assert list(sampler) == whole, "a position for another epoch does not apply"


def test_sample_seeds_differ_by_seed_epoch_and_position():
    seeds = {sample_seed(s, e, p) for s in range(3) for e in range(3) for p in range(100)}
    assert len(seeds) == 900


def test_seeded_samples_draw_the_same_randomness_whatever_the_global_rng():
    data = SeededDataset(NoisyIndex())
    torch.manual_seed(0)
    a = data[(7, 123)]
    state = torch.get_rng_state()
    torch.manual_seed(99)
    assert data[(7, 123)] == a
    torch.manual_seed(0)
    data[(7, 123)]
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG is left untouched"
    assert data[(7, 124)] != a


def test_seeded_collate_runs_the_batch_transform_under_the_first_sample_seed():
    def noisy(items: list[int]) -> torch.Tensor:
        return torch.tensor(items) + torch.rand(len(items))

    batch = [(1, 5), (2, 6)]
    torch.manual_seed(0)
    a = seeded_collate(batch, noisy)
    torch.manual_seed(1)
    assert torch.equal(seeded_collate(batch, noisy), a)
    assert not torch.equal(seeded_collate([(1, 8), (2, 6)], noisy), a)


def _loader(num_workers: int, position: int | None = None) -> ResumableDataLoader:
    loader = ResumableDataLoader(
        SeededDataset(NoisyIndex()),
        sampler=EpochShuffleSampler(50, seed=5),
        batch_size=5,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=seeded_collate,
        current_epoch=lambda: 1,
        trained_batches=lambda: 3,
    )
    if position is not None:
        loader.load_state_dict({"epoch": 1, "position": position})
    return loader


def test_batches_are_the_same_in_workers_and_in_the_main_process():
    main = [batch[1] for batch in _loader(num_workers=0)]
    workers = [batch[1] for batch in _loader(num_workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))


def test_a_resumed_loader_yields_the_rest_of_the_epoch_unchanged():
    whole = [batch[1] for batch in _loader(num_workers=0)]
    loader = _loader(num_workers=0)
    assert loader.state_dict() == {"epoch": 1, "position": 15}, "3 trained batches of 5"
    rest = [batch[1] for batch in _loader(num_workers=0, position=15)]
    assert len(rest) == len(whole) - 3
    assert all(torch.equal(a, b) for a, b in zip(whole[3:], rest, strict=True))


def test_eval_shards_hold_every_sample_exactly_once_without_padding():
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]
    loader = DataLoader(range(11), sampler=ShardSampler(11, 1, 3), batch_size=2)
    assert torch.cat(list(loader)).tolist() == [1, 4, 7, 10]
