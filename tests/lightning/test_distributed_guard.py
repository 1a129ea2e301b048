"""The DDP decision guard on its failing path: two real gloo processes (CPU).

Each process builds a real Lightning ``Trainer`` (``strategy="ddp"``, 2 devices) around an
already-initialised process group, so ``check_same_decision`` all-gathers through Lightning's
DDP strategy exactly as in training. Equal decisions pass; different ranks raise on *both*
processes (a process that raised alone would leave the other blocked in the next collective).
The processes are forked (Lightning is already imported), which keeps the test at a few seconds.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adarank.lightning.distributed import check_same_decision

WORLD = 2
SAME = {"blocks.0": 3, "blocks.1": 1}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = pl.LightningModule()
    module.trainer = trainer
    result = {"world_size": trainer.world_size}
    for label, ranks in (("same", SAME), ("differ", {**SAME, "blocks.1": 1 + rank})):
        try:
            check_same_decision(module, 7, ranks)
            result[label] = "ok"
        except RuntimeError as err:
            result[label] = str(err)
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def test_mismatched_decisions_raise_on_every_process(tmp_path):
    mp.start_processes(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
        start_method="fork",
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for rank, result in enumerate(results):
        assert result["world_size"] == WORLD
        assert result["same"] == "ok", result
        message = result["differ"]
        assert message.startswith("processes took different allocation decisions at step 7"), (
            rank,
            message,
        )
        assert f"'blocks.1': {1 + rank}" in message  # each process names its own decision
