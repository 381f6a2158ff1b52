"""Accuracy of the approximate modes on a real graph: 4 METIS parts of Coauthor CS.

BNS (p = 0.1), the pipeline, and both together, with ``--use-pp``: mean test accuracy (at
the best validation epoch) over 3 seeds within 2 points of single-process training. Kept short
for CI: 2 layers, hidden 16, 45 epochs at lr 0.01 (the single-process run has converged by
epoch 20; at lr 0.02 the one-epoch-stale pipeline trails by about 2 points after 30 epochs).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from bns_pipe.train.config import TrainConfig
from tests.distributed import run_ranks

SEEDS = (0, 1, 2)
BASE = TrainConfig(layers=2, hidden=16, dropout=0.0, lr=0.01, epochs=45, eval_every=3, use_pp=True)
METHODS = {
    "bns": {"sampling_rate": 0.1},
    "pipeline": {"pipeline": True},
    # renorm: with stale rows the unbiased 1/p scaling had one seed in three 6 points low
    "pipeline+bns": {"pipeline": True, "sampling_rate": 0.1, "bns_norm": "renorm"},
}


def _fit_worker(rank: int, world: int, jobs: list[tuple[str, TrainConfig]], out: Path) -> None:
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    ctx = init_distributed("gloo", "cpu", 1, 120)
    results = {}
    for name, config in jobs:
        results[name] = torch.tensor(Trainer(config, ctx).fit()["test_acc"])
    if rank == 0:
        torch.save(results, out / f"world_{world}.pt")
    shutdown()


@pytest.fixture(scope="module")
def accuracies(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = os.environ.get("BNS_PIPE_DATA")
    if not root or not (Path(root) / "coauthor-cs.npz").exists():
        pytest.skip("BNS_PIPE_DATA does not hold coauthor-cs.npz")
    from bns_pipe.data import load_dataset
    from bns_pipe.partition import partition

    tmp = tmp_path_factory.mktemp("accuracy")
    data = load_dataset("coauthor-cs", root=root)
    runs = {1: {"single": {}}, 4: METHODS}
    found = {}
    for world, methods in runs.items():
        partition(data, world, tmp / f"p{world}", verbose=False)
        jobs = [
            (
                f"{method}/{seed}",
                dataclasses.replace(
                    BASE, partition_dir=str(tmp / f"p{world}"), seed=seed, progress=False, **opts
                ),
            )
            for method, opts in methods.items()
            for seed in SEEDS
        ]
        run_ranks(_fit_worker, world, jobs, tmp, timeout=900)
        found.update(torch.load(tmp / f"world_{world}.pt", weights_only=True))
    return {
        method: torch.stack([found[f"{method}/{seed}"] for seed in SEEDS]).double()
        for method in ["single", *METHODS]
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_mean_accuracy_within_two_points_of_single_process(accuracies, method: str) -> None:
    single, ours = accuracies["single"].mean(), accuracies[method].mean()
    assert single > 0.85, accuracies["single"]  # the baseline itself learned
    assert abs(float(ours - single)) <= 0.02, {k: v.tolist() for k, v in accuracies.items()}
