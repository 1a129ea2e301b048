"""ResumableDataLoader: seeded per-epoch order, exact continuation from a saved position."""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import TensorDataset

from adarank.data.resumable import EpochPermutationSampler, ResumableDataLoader

N, BS = 23, 4  # 6 batches per epoch, the last one of 3 items


def _loader(**kw) -> ResumableDataLoader:
    return ResumableDataLoader(TensorDataset(torch.arange(N)), batch_size=BS, **kw)


def _ids(batches) -> list[list[int]]:
    return [b[0].tolist() for b in batches]


def _epoch(loader) -> list[list[int]]:
    return _ids(list(loader))


def _take(loader, k: int) -> list[list[int]]:
    out, it = [], iter(loader)
    for _ in range(k):
        out.append(next(it)[0].tolist())
    return out


def test_epoch_order_is_randperm_of_seed_plus_epoch():
    loader = _loader(seed=7)
    for epoch in range(3):
        expected = torch.randperm(N, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert sum(_epoch(loader), []) == expected
    assert isinstance(loader, _Stateful)


def test_epochs_differ_and_same_seed_same_order():
    a, b, c = _loader(seed=3), _loader(seed=3), _loader(seed=4)
    ea = [_epoch(a) for _ in range(3)]
    assert ea == [_epoch(b) for _ in range(3)]
    assert ea[0] != ea[1] != ea[2]
    assert _epoch(c) != ea[0]
    for e in ea:
        assert sorted(sum(e, [])) == list(range(N))


@pytest.mark.parametrize("k", [0, 1, 3, 5, 6])
def test_state_after_k_batches_continues_exactly(k):
    reference = _loader(seed=1)
    full = [_epoch(reference) for _ in range(3)]

    first = _loader(seed=1)
    _epoch(first)  # epoch 0 done
    assert _take(first, k) == full[1][:k]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == k
    assert all(type(v) is int for v in state.values())

    resumed = _loader(seed=1)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    if k == len(full[1]):  # a complete epoch resumes at the start of the next one
        assert rest == full[2]
    else:
        assert rest == full[1][k:]
        assert _epoch(resumed) == full[2]  # later epochs identical too


def test_stale_iterator_does_not_move_the_position():
    loader = _loader(seed=0)
    old = iter(loader)
    next(old)
    new = iter(loader)  # continues after the first batch
    next(old)  # an abandoned iterator must not count
    assert loader.state_dict()["batches"] == 1
    assert len(list(new)) == 5


def test_set_epoch_keeps_position_of_current_epoch_and_resets_on_change():
    loader = _loader(seed=0)
    _take(loader, 2)
    loader.sampler.set_epoch(0)  # what Lightning does after loading a state: a no-op
    assert loader.state_dict()["batches"] == 2
    loader.sampler.set_epoch(4)
    assert loader.state_dict()["epoch"] == 4 and loader.state_dict()["batches"] == 0
    assert _epoch(loader) == _epoch(_loader(seed=4))


def test_drop_last_and_workers_and_no_shuffle():
    loader = _loader(seed=0, drop_last=True)
    assert len(loader) == 5 and all(len(b) == BS for b in _epoch(loader))
    plain = _loader(shuffle=False)
    assert sum(_epoch(plain), []) == list(range(N))
    reference = _epoch(_loader(seed=2))
    workers = _loader(seed=2, num_workers=2)
    assert _take(workers, 2) == reference[:2]
    state = workers.state_dict()  # workers prefetch, but only handed-out batches count
    assert state["batches"] == 2
    resumed = _loader(seed=2, num_workers=2)
    resumed.load_state_dict(state)
    assert _epoch(resumed) == reference[2:]


def test_shards_partition_the_permutation_like_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    ds = TensorDataset(torch.arange(N))
    shards = [_epoch(_loader(seed=5, num_replicas=3, rank=r)) for r in range(3)]
    for r, shard in enumerate(shards):
        ref = DistributedSampler(ds, num_replicas=3, rank=r, shuffle=True, seed=5)
        assert sum(shard, []) == list(ref)  # padded, interleaved, same permutation
        assert len(shard) == 2
    resumed = _loader(seed=5, num_replicas=3, rank=1)
    state = _loader(seed=5, num_replicas=3, rank=0)
    _take(state, 1)
    resumed.load_state_dict(state.state_dict())
    assert _epoch(resumed) == shards[1][1:]


def test_bad_arguments_and_states():
    with pytest.raises(TypeError, match="owns its order"):
        _loader(sampler=[0, 1])
    with pytest.raises(ValueError, match="batch_size=0"):
        ResumableDataLoader(TensorDataset(torch.arange(3)), batch_size=0)
    with pytest.raises(ValueError, match="rank=3"):
        EpochPermutationSampler(5, num_replicas=3, rank=3)
    loader = _loader()
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({"epoch": 0, "batches": 1})
    with pytest.raises(ValueError, match="batches=-1"):
        loader.load_state_dict({"version": 1, "epoch": 0, "batches": -1})
    state = _loader(num_replicas=2, rank=0).state_dict()
    state["batches"] = 2
    with pytest.warns(UserWarning, match="2 process"):
        loader.load_state_dict(state)
    assert loader.state_dict()["batches"] == 4
