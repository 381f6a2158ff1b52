"""Task metrics: against scikit-learn and OGB's evaluator on fixed inputs, the same on 1 and 4
ranks, and in the metrics records of ``bns-pipe train`` and ``bns-pipe eval``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from bns_pipe.data import load_dataset
from bns_pipe.errors import ConfigError
from bns_pipe.partition import partition
from bns_pipe.train.config import TrainConfig
from bns_pipe.train.distributed import init_distributed, shutdown
from bns_pipe.train.evaluation import (
    binary_rocauc,
    mean_rocauc,
    ogb_evaluator,
    resolve_metric,
    split_metric,
)
from bns_pipe.train.trainer import Trainer
from tests.distributed import run_ranks
from tests.test_failures import train


def test_rocauc_equals_scikit_learn_with_ties() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = (torch.rand(400, generator=generator) < 0.22).long()  # imbalanced, 78 % negative
    scores = (torch.rand(400, generator=generator) + 0.3 * labels).round(decimals=1)  # ties
    assert binary_rocauc(scores.double(), labels) == pytest.approx(
        roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12
    )
    assert binary_rocauc(torch.zeros(5), torch.ones(5)) != binary_rocauc(
        torch.zeros(5), torch.ones(5)
    )


def test_multilabel_rocauc_equals_ogb_proteins_evaluator() -> None:
    generator = torch.Generator().manual_seed(4)
    labels = (torch.rand(300, 112, generator=generator) < 0.3).long()  # ogbn-proteins' 112 tasks
    labels[:, 2] = 0  # a task without positives is skipped, as OGB skips it
    scores = torch.rand(300, 112, generator=generator, dtype=torch.float64) + 0.4 * labels
    ogb = ogb_evaluator("ogbn-proteins").eval({"y_true": labels, "y_pred": scores})["rocauc"]
    assert mean_rocauc(scores, labels) == pytest.approx(ogb, abs=1e-12)
    kept = [t for t in range(112) if t != 2]
    sklearn = roc_auc_score(labels[:, kept].numpy(), scores[:, kept].numpy(), average="macro")
    assert mean_rocauc(scores, labels) == pytest.approx(sklearn, abs=1e-12)


def test_f1_and_ogb_accuracy_on_one_rank() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(500, 5, generator=generator)
    y = torch.randint(0, 5, (500,), generator=generator)
    y[y == 4] = 3  # class 4 never true: sklearn averages over classes that occur
    logits[:, 2] = -10.0  # class 2 true, never predicted
    ids = torch.arange(500)
    macro = f1_score(y.numpy(), logits.argmax(1).numpy(), average="macro")
    assert split_metric("f1", "x", logits, y, ids, False) == pytest.approx(macro, abs=1e-12)
    accuracy = float((logits.argmax(1) == y).double().mean())
    assert split_metric("acc", "ogbn-arxiv", logits, y, ids, False) == pytest.approx(accuracy)
    multi_y = (torch.rand(500, 5, generator=generator) < 0.4).long()
    logits[:, 4] = -10.0  # class 4 neither true nor predicted: not averaged
    macro = f1_score(y.numpy(), logits.argmax(1).numpy(), average="macro")
    assert split_metric("f1", "x", logits, y, ids, False) == pytest.approx(macro, abs=1e-12)
    micro = f1_score(multi_y.numpy(), (logits > 0).long().numpy(), average="micro")
    assert split_metric("f1", "x", logits, multi_y, ids, True) == pytest.approx(micro, abs=1e-12)


def test_auto_picks_the_task_metric() -> None:
    assert resolve_metric("auto", "ogbn-arxiv", False, 40) == "acc"
    assert resolve_metric("auto", "ogbn-proteins", True, 112) == "rocauc"
    assert resolve_metric("auto", "yelp", True, 100) == "f1"
    assert resolve_metric("auto", "cora", False, 7) == "accuracy"
    assert resolve_metric("rocauc", "synthetic", False, 2) == "rocauc"
    with pytest.raises(ConfigError, match="rocauc needs a binary or multilabel task"):
        resolve_metric("rocauc", "cora", False, 7)


def _binary_graph():
    return load_dataset("synthetic", num_nodes=1500, num_features=16, num_classes=2)


def _evaluate(rank: int, world: int, part_dir: str, out: str) -> None:
    config = TrainConfig(
        partition_dir=part_dir, dtype="float64", metric="rocauc", hidden=8, progress=False
    )
    ctx = init_distributed("gloo", "cpu", 1, 60.0)
    try:
        scores = Trainer(config, ctx).evaluate()  # the initial model: same weights everywhere
    finally:
        shutdown()
    Path(out, f"rank_{rank}.json").write_text(json.dumps(scores))


def test_rocauc_and_f1_the_same_on_one_and_four_ranks(tmp_path: Path) -> None:
    data = _binary_graph()
    results = {}
    for world in (1, 4):
        part, out = tmp_path / f"p{world}", tmp_path / f"out{world}"
        partition(data, world, part, verbose=False)
        out.mkdir()
        run_ranks(_evaluate, world, str(part), str(out), timeout=120)
        results[world] = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]
    one = results[1][0]
    assert 0 < one["val_metric"] < 1 and one["val_metric"] != one["val"]
    for scores in results[4]:
        for key, value in one.items():
            assert scores[key] == pytest.approx(value, abs=1e-12), key


def test_train_and_eval_report_the_metric(tmp_path: Path) -> None:
    part = tmp_path / "p2"
    partition(_binary_graph(), 2, part, verbose=False)
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    done = train(
        "--partition-dir",
        str(part),
        "--epochs",
        "4",
        "--eval-every",
        "2",
        "--metric",
        "rocauc",
        "--metrics-jsonl",
        str(metrics),
        "--checkpoint-dir",
        str(ckpt),
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs, final = rows[1:-1], rows[-1]
    assert [("val_metric" in r) for r in epochs] == [False, True, False, True]
    assert final["metric"] == "rocauc" and "test_acc" in final and "best_val_acc" in final
    assert final["best_val_metric"] == max(r["val_metric"] for r in epochs if "val_metric" in r)
    assert 0 < final["test_metric"] <= 1
    command = [
        sys.executable,
        "-m",
        "bns_pipe",
        "eval",
        "--checkpoint",
        str(ckpt / "epoch_000004"),
        "--partition-dir",
        str(part),
        "--metric",
        "rocauc",
    ]
    evaluated = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["metric"] == "rocauc"
    assert {"train", "val", "test", "train_metric", "val_metric", "test_metric"} <= set(result)
    assert result["val_metric"] == pytest.approx(epochs[-1]["val_metric"], abs=1e-12)
    four = tmp_path / "four"
    graph = load_dataset("synthetic", num_nodes=400, num_features=8, num_classes=4)
    partition(graph, 1, four, verbose=False)
    bad = train("--partition-dir", str(four), "--epochs", "1", "--metric", "rocauc")
    assert bad.returncode == 2 and "rocauc needs a binary or multilabel task" in bad.stderr
