"""Task metrics, computed exactly across ranks: accuracy, ROC-AUC, F1 and OGB's evaluator.

``--metric auto`` resolves to OGB's metric for ``ogbn-*`` datasets (``ogb.nodeproppred.
Evaluator(name).eval_metric``, e.g. ``"acc"``), micro-F1 (``"f1"``) for multilabel tasks and
``"accuracy"`` otherwise. Each rank holds the logits of its inner nodes:

- accuracy and F1 need only counts, summed over ranks: correct / total; macro-F1 (single
  label) = mean of 2·TP / (2·TP + FP + FN) over the classes that are true or predicted in the
  split (scikit-learn's convention), with TP, FP, FN per class;
  micro-F1 (multilabel) = 2·TP / (2·TP + FP + FN) over all (node, label) pairs;
- ROC-AUC and OGB's evaluator need every score: the ranks gather (global id, scores, labels)
  of the split and sort them by global id, so every rank computes the same value as one
  process would. ROC-AUC is the Mann–Whitney statistic with average ranks for ties (equal to
  scikit-learn's ``roc_auc_score``): binary tasks score the positive class's softmax
  probability; multilabel tasks average over the labels that have both classes in the split,
  as OGB does for ogbn-proteins.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bns_pipe.errors import ConfigError
from bns_pipe.train.config import METRICS


def resolve_metric(requested: str, dataset: str, multilabel: bool, num_classes: int) -> str:
    """The metric ``requested`` names for this task ("auto": see the module docstring)."""
    if requested not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, not {requested!r}")
    if requested == "auto":
        if dataset.startswith("ogbn-"):
            return ogb_evaluator(dataset).eval_metric
        return "f1" if multilabel else "accuracy"
    if requested == "rocauc" and not multilabel and num_classes != 2:
        raise ConfigError(
            f"--metric rocauc needs a binary or multilabel task; this one has {num_classes} "
            "classes (use accuracy or f1)"
        )
    return requested


def ogb_evaluator(dataset: str):
    """OGB's own evaluator for ``dataset`` (ships with the ``ogb`` package, no download)."""
    from ogb.nodeproppred import Evaluator

    try:
        return Evaluator(dataset)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"OGB has no evaluator for {dataset!r}: {exc}") from None


def split_metric(
    metric: str,
    dataset: str,
    logits: torch.Tensor,
    y: torch.Tensor,
    ids: torch.Tensor,
    multilabel: bool,
    group: dist.ProcessGroup | None = None,
) -> float:
    """The metric over one split, the same on every rank: this rank's rows are ``logits``
    (n, C), labels ``y`` (n,) or (n, C) of 0/1, and global ids ``ids`` (n,)."""
    if metric in ("accuracy", "f1"):
        return _from_counts(metric, logits, y, multilabel, group)
    ids, logits, y = _gather_sorted(ids, logits, y, group)
    if metric == "rocauc":
        scores = torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)[:, 1:]
        labels = y if multilabel else y.unsqueeze(1)
        return mean_rocauc(scores.double(), labels)
    evaluator = ogb_evaluator(dataset)  # OGB's own metric ("acc", "rocauc", ...)
    if multilabel:
        y_true, y_pred = y, logits
    else:
        y_true, y_pred = y.unsqueeze(1), logits.argmax(1, keepdim=True)
    return float(evaluator.eval({"y_true": y_true.cpu(), "y_pred": y_pred.cpu()})[metric])


def accuracy_counts(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """[numerator, denominator] of accuracy, summable over ranks: correct and total; for
    multilabel tasks micro-F1's 2·TP and 2·TP + FP + FN."""
    if multilabel:
        pred, true = logits > 0, y > 0
        tp = (pred & true).sum()
        return torch.stack([2 * tp, 2 * tp + (pred & ~true).sum() + (~pred & true).sum()])
    total = torch.tensor(y.size(0), device=y.device)
    return torch.stack([(logits.argmax(1) == y).sum(), total])


def _from_counts(
    metric: str, logits: torch.Tensor, y: torch.Tensor, multilabel: bool, group
) -> float:
    if metric == "accuracy" or multilabel:  # multilabel f1 is micro-F1: the same counts
        counts = accuracy_counts(logits, y, multilabel).double().cpu()
    else:  # macro-F1: per class TP, FP, FN
        classes = logits.size(1)
        pred = logits.argmax(1)
        tp = torch.bincount(y[pred == y], minlength=classes)
        fp, fn = (
            torch.bincount(pred, minlength=classes) - tp,
            torch.bincount(y, minlength=classes) - tp,
        )
        counts = torch.stack([tp, fp, fn]).double().cpu()
    if dist.is_initialized():
        dist.all_reduce(counts, group=group)
    if metric == "accuracy" or multilabel:
        return float(counts[0] / counts[1].clamp_min(1))
    tp, fp, fn = counts
    seen = 2 * tp + fp + fn > 0  # classes true or predicted somewhere
    if not seen.any():
        return 0.0
    return float((2 * tp / (2 * tp + fp + fn).clamp_min(1))[seen].mean())  # scikit-learn's


def _gather_sorted(ids: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, group):
    """Every rank's (ids, logits, y) of a split, concatenated in global-id order."""
    rows = torch.cat(
        [ids.unsqueeze(1).double(), logits.double(), y.reshape(len(y), -1).double()], 1
    )
    rows = rows.cpu()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        world = dist.get_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(rows)]), group=group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, rows.size(1), dtype=rows.dtype)
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        rows = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])
    rows = rows[rows[:, 0].argsort()]
    classes = logits.size(1)
    labels = rows[:, 1 + classes :].to(y.dtype)
    return rows[:, 0].long(), rows[:, 1 : 1 + classes], labels if y.dim() > 1 else labels[:, 0]


def binary_rocauc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC-AUC of ``scores`` (n,) for 0/1 ``labels`` (n,): the probability that a positive
    outranks a negative, ties counting half (NaN without both classes)."""
    positive = labels.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # 1-based ranks, ties averaged
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mean_rocauc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean ROC-AUC over the columns of (n, T) ``scores`` / ``labels`` that hold both classes."""
    values = [binary_rocauc(scores[:, t], labels[:, t]) for t in range(scores.size(1))]
    values = [v for v in values if v == v]
    if not values:
        raise ConfigError("ROC-AUC needs positive and negative labels in the split")
    return sum(values) / len(values)
