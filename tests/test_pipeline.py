"""PipeGCN: halo features and gradients are exactly one epoch stale, with and without BNS.

Ranks train a few epochs while the pipeline's four transport calls are recorded: what each
layer sent, which halo rows it aggregated, which halo gradients it returned and what the
owners added. The test then checks, by global node id, that epoch t used the owners' values
of epoch t-1 (and not those of epoch t), on 2 ranks and on 4 ranks with empty send lists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data

from bns_pipe.comm.pipeline import Smoother
from bns_pipe.data import load_dataset
from bns_pipe.partition import load_partition, partition
from bns_pipe.train.config import TrainConfig
from tests.distributed import run_ranks

EPOCHS = 4


def _record_worker(rank: int, world: int, config: TrainConfig, out: Path) -> None:
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    ctx = init_distributed("gloo", "cpu", 1, 60)
    trainer = Trainer(config, ctx)
    pipe, record, epoch = trainer.pipeline, {}, [0]
    send_features, halo_features = pipe.send_features, pipe.halo_features
    send_gradients, add_returned = pipe.send_gradients, pipe.add_returned_gradients

    def key(name: str, layer: int) -> str:
        return f"{name}.{epoch[0]}.{layer}"

    def record_send_features(x, layer):
        record[key("input", layer)] = x.clone()
        return send_features(x, layer)

    def record_halo_features(sent, layer):
        rows = halo_features(sent, layer)
        record[key("used", layer)] = rows.clone()
        record[key("used_keep", layer)] = pipe.plan.halo_keep.clone()
        return rows

    def record_send_gradients(grad_halo, layer):
        record[key("grad_halo", layer)] = grad_halo.clone()
        record[key("grad_keep", layer)] = pipe.plan.halo_keep.clone()
        return send_gradients(grad_halo, layer)

    def record_add_returned(sent, layer, grad_x):
        before = grad_x.clone()
        add_returned(sent, layer, grad_x)
        record[key("added", layer)] = grad_x - before

    pipe.send_features, pipe.halo_features = record_send_features, record_halo_features
    pipe.send_gradients, pipe.add_returned_gradients = record_send_gradients, record_add_returned
    for t in range(EPOCHS):
        epoch[0] = t
        trainer.train_step(t)
    pipe.drain()  # as fit() does: no transfer may be in flight when the group is destroyed
    torch.save(record, out / f"rank_{rank}.pt")
    shutdown()


def line_of_clusters(parts: int = 4, size: int = 60, isolated_last: bool = False) -> Data:
    """Dense clusters joined only to their neighbours in a line: with one cluster per rank,
    ranks i and j > i + 1 share no edge, so their send lists are empty. ``isolated_last``
    leaves the last cluster unjoined (its rank has no halo at all)."""
    gen = torch.Generator().manual_seed(0)
    edges = []
    for c in range(parts):
        base = c * size
        src = torch.randint(0, size, (size * 6,), generator=gen) + base
        dst = torch.randint(0, size, (size * 6,), generator=gen) + base
        edges.append(torch.stack([src, dst]))
        if c + 1 < parts and not (isolated_last and c + 2 == parts):
            bridge = torch.arange(0, size, 6)
            edges.append(torch.stack([bridge + base, bridge + base + size]))
    ei = torch.cat(edges, 1)
    ei = torch.cat([ei, ei.flip(0)], 1)
    ei = ei[:, ei[0] != ei[1]].unique(dim=1)
    n = parts * size
    y = torch.arange(n) // size % 3
    split = torch.arange(n) % 10
    return Data(
        x=torch.randn(n, 12, generator=gen),
        edge_index=ei,
        y=y,
        num_classes=3,
        multilabel=False,
        train_mask=split < 5,
        val_mask=split == 5,
        test_mask=split > 5,
    )


def _graphs(world: int):
    if world == 2:
        data = load_dataset("synthetic", num_nodes=600, num_features=12, num_classes=4)
        return data, "random"
    return line_of_clusters(world), "metis"


def _global(parts, values: dict, name: str, t: int, layer: int, n: int) -> torch.Tensor:
    """Assemble the owners' per-inner-row ``name`` of epoch t at one layer by global id."""
    out = None
    for part, rec in zip(parts, values, strict=True):
        rows = rec[f"{name}.{t}.{layer}"]
        if out is None:
            out = rows.new_zeros((n, rows.size(1)))
        out[part.inner_global_ids] = rows
    return out


@pytest.mark.parametrize(
    ("world", "rate", "model"),
    [(2, 1.0, "gcn"), (2, 0.5, "gcn"), (4, 1.0, "gcn"), (4, 0.5, "gcn"), (2, 0.5, "gat")],
    ids=lambda v: str(v),
)
def test_halo_values_are_one_epoch_stale(
    tmp_path: Path, world: int, rate: float, model: str
) -> None:
    """GAT's halo rows are its transformed features and source logits, [z | s]: the same
    transport, so the same staleness."""
    data, method = _graphs(world)
    partition(data, world, tmp_path / "p", method=method, verbose=False)
    parts = [load_partition(tmp_path / "p", r) for r in range(world)]
    if world == 4:  # the precondition of the empty-send-list case
        pairs = [(p.rank, j) for p in parts for j, ids in enumerate(p.send_ids) if j != p.rank]
        assert any(parts[i].send_ids[j].numel() == 0 for i, j in pairs)
    config = TrainConfig(
        partition_dir=str(tmp_path / "p"),
        model=model,
        heads=2 if model == "gat" else 1,
        layers=3,
        hidden=8,
        dropout=0.5,
        lr=0.05,
        dtype="float64",
        pipeline=True,
        sampling_rate=rate,
        progress=False,
    )
    run_ranks(_record_worker, world, config, tmp_path, timeout=180)
    recs = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(world)]
    n = data.num_nodes
    checked = {"features": 0, "gradients": 0}
    for layer in range(config.layers):
        if f"input.0.{layer}" not in recs[0]:
            continue
        for t in range(EPOCHS):
            now = _global(parts, recs, "input", t, layer, n)
            before = _global(parts, recs, "input", t - 1, layer, n) if t else now
            for part, rec in zip(parts, recs, strict=True):
                ids = part.halo_global_ids[rec[f"used_keep.{t}.{layer}"]]
                used = rec[f"used.{t}.{layer}"]
                assert torch.equal(used, before[ids])  # epoch 0 warms up with its own rows
                if t and ids.numel():
                    assert not torch.allclose(used, now[ids])
                    checked["features"] += 1
        if f"grad_halo.0.{layer}" not in recs[0]:
            continue
        for t in range(EPOCHS):
            sent = []
            for s in (t - 1, t) if t else (t,):
                total = torch.zeros(
                    n, recs[0][f"grad_halo.{s}.{layer}"].size(1), dtype=torch.float64
                )
                for part, rec in zip(parts, recs, strict=True):
                    ids = part.halo_global_ids[rec[f"grad_keep.{s}.{layer}"]]
                    total.index_add_(0, ids, rec[f"grad_halo.{s}.{layer}"])
                sent.append(total)
            for part, rec in zip(parts, recs, strict=True):
                added = rec[f"added.{t}.{layer}"]
                torch.testing.assert_close(added, sent[0][part.inner_global_ids])
                if t and added.abs().sum() > 0:
                    assert not torch.allclose(added, sent[1][part.inner_global_ids])
                    checked["gradients"] += 1
    assert checked["features"] > 0 and checked["gradients"] > 0, checked


def test_smoother_is_a_bias_corrected_moving_average() -> None:
    gamma = 0.9
    smoother = Smoother(gamma, 3)
    keep_all = torch.ones(3, dtype=torch.bool)
    first = torch.tensor([[1.0], [2.0], [3.0]])
    # one update: the corrected average is the value itself, not (1 - γ) x value
    torch.testing.assert_close(smoother(first, keep_all), first)
    second = torch.tensor([[5.0]])
    only_middle = torch.tensor([False, True, False])
    expected = (gamma * (1 - gamma) * 2.0 + (1 - gamma) * 5.0) / (1 - gamma**2)
    torch.testing.assert_close(smoother(second, only_middle), torch.tensor([[expected]]))
    assert smoother.count.tolist() == [1, 2, 1]
    assert Smoother(0.0, 3)(first, keep_all) is first
    with pytest.raises(ValueError, match="smoothing factor"):
        Smoother(1.0, 3)


def test_one_rank_pipeline_is_exact_single_process(tmp_path: Path) -> None:
    """On one rank nothing travels, so ``--pipeline`` (and its smoothing) change nothing."""
    from tests.test_gold import check_against_reference, gold_dataset, run_world

    options = {"model": "gcn", "pipeline": True, "feat_smooth": 0.9, "grad_smooth": 0.9}
    results = run_world(1, [("synthetic", options)], tmp_path)
    check_against_reference(gold_dataset("synthetic"), results["synthetic/0"], **options)


def _fit_worker(rank: int, world: int, config: TrainConfig) -> None:
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    ctx = init_distributed("gloo", "cpu", 1, 60)
    Trainer(config, ctx).fit()
    shutdown()


def test_sampled_pipeline_with_a_rank_without_halo(tmp_path: Path) -> None:
    """A rank without halo sees the same (empty) sample every epoch while its peers' differ:
    every rank must still issue the same transfers (this once deadlocked at warm-up)."""
    partition(line_of_clusters(4, isolated_last=True), 4, tmp_path / "p", verbose=False)
    assert any(load_partition(tmp_path / "p", r).n_halo == 0 for r in range(4))
    config = TrainConfig(
        partition_dir=str(tmp_path / "p"),
        layers=3,
        hidden=8,
        epochs=4,
        pipeline=True,
        sampling_rate=0.5,
        eval_every=0,
        progress=False,
    )
    run_ranks(_fit_worker, 4, config, timeout=120)
