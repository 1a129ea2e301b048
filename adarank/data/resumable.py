"""A training ``DataLoader`` that can be checkpointed mid-epoch and resumed exactly.

Lightning saves the ``state_dict()`` of every training loader that implements its ``_Stateful``
protocol into ``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]`` and, on
resume, calls ``load_state_dict()`` in ``FitLoop.setup_data`` *before* it creates the epoch's
iterator; the epoch loop then adds the restored batch count to its fetcher, so an iterator that
yields only the remaining batches of the epoch is exactly what it expects.

Order. Epoch ``e`` visits a permutation drawn from ``torch.Generator().manual_seed(seed + e)``
(the identity when ``shuffle=False``), so it depends on nothing but ``(seed, e)``: resuming
epoch ``e`` at batch ``k`` re-draws the same permutation, skips the ``k·batch_size`` indices
already trained on (without loading them) and continues; later epochs are identical too.

Position. The state is ``(epoch, batches)``, where ``batches`` counts the batches of the epoch
that the loader's iterator has *handed to its consumer*. Lightning's training fetcher does not
prefetch from loaders that have a length (``_PrefetchDataFetcher`` skips pre-fetching when
``sized_len`` is known) and saves checkpoints in ``on_train_batch_end`` / at epoch ends, so at
every save this count equals the number of batches the training loop has consumed
(``fit_loop.epoch_loop.batch_progress.current.ready``). A state whose epoch is complete resumes
at batch 0 of the next epoch.

Workers. With ``num_workers > 0`` the worker processes prefetch *indices* and batches, but the
count is taken on the main-process side of the iterator, so it is unaffected. The loader draws
its workers' base seed from its own generator seeded with ``seed + epoch`` (never from the global
RNG), so workers are seeded identically in both runs; batch ``i`` is however loaded by worker
``(i - k) mod num_workers`` after resuming at ``k``, so a dataset that draws random numbers
per item in its workers is only reproducible for ``num_workers = 0`` (the built-in datasets
draw none).

DDP. The sampler subclasses ``DistributedSampler``, so Lightning does not replace it. Each
process iterates its own shard ``perm[rank::world]`` of the shared permutation, padded like
``DistributedSampler`` (``drop_last=False``) to a multiple of the world size; world size and rank
are read from ``torch.distributed`` when the epoch's iterator is created (or given explicitly).
Every process consumes the same number of batches, so rank 0's saved position is valid for all.
Resuming with a different world size cannot continue the same shards: it warns and continues at
the proportional position of the new shards (approximate, not exact).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["EpochPermutationSampler", "ResumableDataLoader"]

STATE_VERSION = 1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochPermutationSampler(DistributedSampler):
    """One process's shard of a seeded per-epoch permutation, from a start offset.

    The permutation of epoch ``e`` depends only on ``seed + e``. ``DistributedSampler`` is
    subclassed (without calling its constructor, which needs an initialised process group) only
    so that Lightning keeps this sampler instead of injecting its own under DDP.

    Args:
        size: number of items in the dataset.
        shuffle: permute each epoch (else visit ``0..size-1`` in order).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        num_replicas: world size (None: from ``torch.distributed`` at iteration time, else 1).
        rank: this process's rank (None: from ``torch.distributed``, else 0).

    Attributes:
        epoch: the epoch being (or next to be) iterated.
        consumed: batches of that epoch handed out (kept by :class:`ResumableDataLoader`).
        start: number of this shard's indices to skip at the start of the next iterator.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size={size!r}: expected a non-negative integer")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed={seed!r}: expected an int")
        if (num_replicas is None) != (rank is None):
            raise ValueError(f"num_replicas={num_replicas!r}, rank={rank!r}: set both or neither")
        if num_replicas is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r}: expected 0 <= rank < num_replicas={num_replicas}")
        self.size, self.shuffle, self.seed = size, bool(shuffle), seed
        self._replicas, self._rank = num_replicas, rank
        self.epoch, self.consumed, self.start = 0, 0, 0
        self.drop_last = False  # DistributedSampler attribute: the shard is padded, never cut

    @property
    def num_replicas(self) -> int:
        """World size (explicit, else from ``torch.distributed``, else 1)."""
        return self._replicas if self._replicas is not None else _world()[0]

    @property
    def rank(self) -> int:
        """This process's rank (explicit, else from ``torch.distributed``, else 0)."""
        return self._rank if self._rank is not None else _world()[1]

    @property
    def num_samples(self) -> int:
        """Indices in one shard of a full epoch."""
        return math.ceil(self.size / self.num_replicas) if self.size else 0

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's shard of epoch ``epoch``'s permutation (full epoch, no offset)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        world, total = self.num_replicas, self.num_samples * self.num_replicas
        if total > len(order) and order:  # pad like DistributedSampler(drop_last=False)
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return order[self.rank : total : world]

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its start; a no-op when it is already the current epoch.

        Lightning calls this at every epoch start, after a resumed state was loaded, so keeping
        the offset for the current epoch is what lets a restored position survive.
        """
        if epoch != self.epoch:
            self.epoch, self.consumed, self.start = int(epoch), 0, 0

    def freeze(self) -> None:
        """Fix the indices the next ``iter(self)`` returns to the current epoch and offset.

        ``BatchSampler`` asks for its sampler's iterator lazily, at the first batch; freezing
        when the loader's iterator is created keeps a later ``set_epoch`` from changing it.
        """
        self._frozen = self.epoch_indices(self.epoch)[self.start :]

    def __iter__(self) -> Iterator[int]:
        frozen, self._frozen = getattr(self, "_frozen", None), None
        if frozen is None:
            frozen = self.epoch_indices(self.epoch)[self.start :]
        return iter(frozen)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with a seeded per-epoch order and a checkpointable mid-epoch position.

    Implements Lightning's ``_Stateful`` protocol (``state_dict`` / ``load_state_dict``); the
    state holds plain ints only, so checkpoints load with ``torch.load(weights_only=True)``.
    Outside Lightning, iterating to the end of an epoch moves to the next one; breaking off
    early and iterating again continues the same epoch after the last batch handed out.

    Args:
        dataset: map-style dataset.
        batch_size: batch size.
        shuffle: permute each epoch with ``seed + epoch`` (else dataset order).
        seed: base seed of the permutations.
        drop_last: drop the last incomplete batch of each epoch.
        num_replicas: world size for sharding (None: ``torch.distributed`` or 1).
        rank: this process's rank (None: ``torch.distributed`` or 0).
        **kwargs: any other ``DataLoader`` argument except ``sampler``, ``batch_sampler`` and
            ``generator`` (collate_fn, num_workers, pin_memory, ...).

    Raises:
        TypeError: ``sampler``, ``batch_sampler`` or ``generator`` given.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        **kwargs: Any,
    ) -> None:
        bad = sorted({"sampler", "batch_sampler", "generator"} & set(kwargs))
        if bad:
            raise TypeError(
                f"ResumableDataLoader owns its order; got {bad} (use shuffle=/seed= instead)"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
        sampler = EpochPermutationSampler(
            len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank
        )
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            generator=torch.Generator(),
            **kwargs,
        )
        self.seed = seed
        self._token: object | None = None

    @property
    def epoch(self) -> int:
        """The epoch being (or next to be) iterated."""
        return self.sampler.epoch

    def _batches_in_epoch(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        sampler: EpochPermutationSampler = self.sampler
        if sampler.consumed >= self._batches_in_epoch():  # epoch complete: start the next one
            sampler.set_epoch(sampler.epoch + 1)
        sampler.start = sampler.consumed * self.batch_size
        sampler.freeze()
        # workers' base seed from our own generator: deterministic, and no global-RNG draw
        self.generator.manual_seed(self.seed + sampler.epoch)
        token = self._token = object()
        return self._count(super().__iter__(), token)

    def _count(self, it: Iterator[Any], token: object) -> Iterator[Any]:
        for batch in it:
            if self._token is token:  # a newer iterator supersedes this one
                self.sampler.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"version", "epoch", "batches", "seed", "num_replicas"}`` (all ints)."""
        return {
            "version": STATE_VERSION,
            "epoch": int(self.sampler.epoch),
            "batches": int(self.sampler.consumed),
            "seed": int(self.seed),
            "num_replicas": int(self.sampler.num_replicas),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``: the next iterator resumes that epoch after its batches.

        Raises:
            ValueError: unknown version, or a negative epoch or batch count.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"ResumableDataLoader state version {state.get('version')!r}, "
                f"expected {STATE_VERSION}"
            )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if epoch < 0 or batches < 0:
            raise ValueError(f"state epoch={epoch}, batches={batches}: expected both >= 0")
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(
                f"resuming a data order saved with seed={state['seed']} using seed={self.seed}: "
                "the remaining batches of the epoch follow the new seed's permutation",
                stacklevel=2,
            )
        world = int(state.get("num_replicas", 1))
        if world != self.sampler.num_replicas:
            warnings.warn(
                f"resuming a data order saved with {world} process(es) on "
                f"{self.sampler.num_replicas}: the shards differ, so the epoch continues at the "
                "proportional position (not an exact resume)",
                stacklevel=2,
            )
            batches = batches * world // self.sampler.num_replicas
        self.sampler.epoch, self.sampler.consumed, self.sampler.start = epoch, batches, 0
        self._token = None
