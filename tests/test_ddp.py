"""Multi-process training: two CPU ranks over gloo, as torchrun would start them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp
from support import free_port
from trainer_support import TINY, synthetic_prepared

from trainer.checkpoint import load_checkpoint
from trainer.models import create_model
from trainer.train import TrainConfig, train

WORLD_SIZE = 2


def rank_main(rank: int, port: int, data: str, out: str, results: str) -> None:
    # what torchrun sets for each process
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    config = TrainConfig(
        data=data,
        out=out,
        model="samplecnn",
        hparams=TINY,
        epochs=2,
        batch_size=8,
        device="cpu",
        progress=False,
        tensorboard=False,
    )
    result = train(config)
    torch.save(result.model.state_dict(), Path(results) / f"rank{rank}.pt")


def test_two_ranks_end_with_identical_weights(tmp_path):
    data = synthetic_prepared(tmp_path, 40, seconds=2.0)
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(
        rank_main,
        args=(free_port(), str(data.root), str(tmp_path / "run"), str(results)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    rank0 = torch.load(results / "rank0.pt", weights_only=True)
    rank1 = torch.load(results / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key  # weights and BatchNorm statistics

    # rank 0 wrote the checkpoint, and it holds what both ranks trained
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.equal(last["state_dict"][key], rank0[key]) for key in rank0)
    assert last["train_state"]["epoch"] == 2
    torch.manual_seed(0)  # training moved the weights away from their (seed 0) start
    start = create_model("samplecnn", data.n_tags, **TINY).state_dict()
    assert not torch.equal(start["head.weight"], rank0["head.weight"])
