"""The Python API: ``bns_pipe.fit`` from a notebook-style script (twice in one process, 2
ranks on Cora) returns a PyG model whose logits are our evaluation's, and errors reach the
caller; ``bns_pipe.load_model`` rebuilds every architecture with ``torch_geometric.nn``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bns_pipe
from bns_pipe.api import content_hash
from bns_pipe.data import load_dataset, validate_data
from bns_pipe.errors import BnsPipeError, ConfigError
from bns_pipe.partition import partition
from bns_pipe.train.config import TrainConfig
from bns_pipe.train.distributed import init_distributed, shutdown
from bns_pipe.train.trainer import Trainer

NOTEBOOK = """
import json, sys
import torch
import bns_pipe
from bns_pipe.data import load_dataset

data = load_dataset("cora")
out = []
for seed in (0, 1):  # twice in one process
    result = bns_pipe.fit(
        data, parts=2, epochs=6, hidden=16, seed=seed, normalize_features=True,
        weight_decay=5e-4, progress=False, checkpoint_dir=sys.argv[1] + f"/ckpt{seed}",
    )
    with torch.no_grad():
        pred = result.model(data.x, data.edge_index).argmax(1)
    masks = {"train": data.train_mask, "val": data.val_mask, "test": data.test_mask}
    accuracy = {s: float((pred[m] == data.y[m]).double().mean()) for s, m in masks.items()}
    out.append({
        "checkpoint": str(result.checkpoint),
        "epochs": [r["epoch"] for r in result.records],
        "final_val": result.final["best_val_acc"],
        "accuracy": accuracy,
        "module": type(result.model.convs[0]).__module__,
    })
print(json.dumps(out))
"""


def _cora_root() -> str:
    root = os.environ.get("BNS_PIPE_DATA")
    if not root:
        pytest.skip("BNS_PIPE_DATA is not set: no root holds Cora")
    return root


def test_notebook_fit_twice_and_eval_agree(tmp_path: Path) -> None:
    _cora_root()
    done = subprocess.run(
        [sys.executable, "-c", NOTEBOOK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["epochs"] for r in runs] == [list(range(6))] * 2
    assert runs[0]["module"].startswith("torch_geometric.nn")
    assert runs[0]["accuracy"] != runs[1]["accuracy"]  # two seeds, two models
    for run in runs:
        evaluated = subprocess.run(
            [
                sys.executable,
                "-m",
                "bns_pipe",
                "eval",
                "--checkpoint",
                run["checkpoint"],
                "--dataset",
                "cora",
                "--parts",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert evaluated.returncode == 0, evaluated.stderr
        ours = json.loads(evaluated.stdout.strip().splitlines()[-1])
        for split in ("train", "val", "test"):
            assert run["accuracy"][split] == pytest.approx(ours[split], abs=1e-12), split


@pytest.fixture(scope="module")
def small_graph():
    data = load_dataset("synthetic", num_nodes=600, num_features=12, num_classes=3)
    data.x = data.x.abs()  # counts-like, so --normalize-features applies
    return data


@pytest.mark.parametrize(
    "options",
    [
        {"model": "gcn", "norm": "none", "layers": 2},
        {"model": "sage", "norm": "layer", "layers": 3},
        {"model": "gcn", "norm": "batch", "layers": 3, "normalize_features": True},
        {"model": "sage", "norm": "batch", "layers": 2, "use_pp": True},
        {"model": "gat", "heads": 2, "norm": "layer", "layers": 3},
    ],
    ids=["gcn", "sage-layer", "gcn-batch-normalized", "sage-batch-pp", "gat-layer"],
)
def test_load_model_logits_equal_our_evaluation(small_graph, tmp_path: Path, options) -> None:
    """One rank trains a few epochs; the PyG model from its checkpoint gives the logits of
    our evaluation on the full graph (float64, so to rounding)."""
    part = tmp_path / "p1"
    partition(small_graph, 1, part, verbose=False)
    config = TrainConfig(
        partition_dir=str(part),
        epochs=3,
        hidden=8,
        dtype="float64",
        checkpoint_dir=str(tmp_path / "ckpt"),
        progress=False,
        backend="gloo",
        device="cpu",
        **options,
    ).validate()
    ctx = init_distributed("gloo", "cpu", 1, 60.0)
    try:
        trainer = Trainer(config, ctx)
        trainer.fit()
        trainer.model.eval()
        view = trainer.eval_view
        with torch.no_grad():
            ours = trainer.model(view.graph, view.x, precomputed=view.precomputed)
        order = view.graph.global_ids
    finally:
        shutdown()
    model = bns_pipe.load_model(tmp_path / "ckpt" / "epoch_000003")
    with torch.no_grad():
        theirs = model(small_graph.x.double(), small_graph.edge_index)
    torch.testing.assert_close(theirs[order], ours, rtol=1e-9, atol=1e-9)


def test_worker_errors_reach_the_caller(small_graph) -> None:
    with pytest.raises(BnsPipeError, match="the loss became nan"):
        bns_pipe.fit(small_graph, parts=2, epochs=30, lr=1e30, progress=False)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['epochz'\]"):
        bns_pipe.fit(small_graph, parts=2, epochz=3)


def test_two_graphs_never_share_a_partition(small_graph) -> None:
    graph = validate_data(small_graph)
    other = graph.clone()
    other.x = other.x.clone()
    other.x[5, 3] += 1.0
    assert content_hash(graph) == content_hash(validate_data(small_graph))
    assert content_hash(graph) != content_hash(other)
