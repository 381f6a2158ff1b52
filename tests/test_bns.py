"""BNS in training: p = 1 is exactly vanilla (GCN, SAGE, GAT), p = 0 drops the halo, bad p is
rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch_geometric.utils import to_undirected

from bns_pipe.errors import ConfigError
from bns_pipe.train.config import TrainConfig
from tests.test_gold import BASE, EPOCHS, check_against_reference, gold_dataset, run_world

SMALL = {"norm": "none", "layers": 2}  # the p = 0 reference below is this model
CASES = [
    {"model": "gcn", "sampling_rate": 1.0},
    {"model": "sage", "sampling_rate": 1.0, "bns_norm": "renorm"},
    {"model": "gcn", "sampling_rate": 0.0, **SMALL},
    {"model": "gcn", "sampling_rate": 0.3},
    {"model": "gat", "heads": 2, "sampling_rate": 1.0},
]


@pytest.fixture(scope="module")
def bns_runs(tmp_path_factory) -> dict[str, list[dict]]:
    return run_world(2, [("synthetic", c) for c in CASES], tmp_path_factory.mktemp("bns"))


@pytest.mark.parametrize("index", [0, 1, 4])
def test_rate_one_is_exactly_vanilla(bns_runs, index: int) -> None:
    check_against_reference(
        gold_dataset("synthetic"), bns_runs[f"synthetic/{index}"], **CASES[index]
    )


def test_rate_zero_equals_training_without_the_halo(bns_runs, tmp_path: Path) -> None:
    """Reference: the cut edges removed, GCN normalisation still by global degrees."""
    data = gold_dataset("synthetic")
    results = bns_runs["synthetic/2"]
    owner = torch.empty(data.num_nodes, dtype=torch.long)
    for rank, r in enumerate(results):
        owner[r["eval_ids"]] = rank
    src, dst = data.edge_index
    keep = owner[src] == owner[dst]
    degree = torch.bincount(dst, minlength=data.num_nodes).double() + 1
    weight = (degree[src[keep]] * degree[dst[keep]]).rsqrt()

    from tests.test_gold import initial_state

    state = initial_state(data, "gcn", 2, BASE["hidden"], BASE["seed"], norm="none")
    x = data.x.double()
    mask = data.train_mask
    params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    optimizer = torch.optim.Adam(params.values(), lr=BASE["lr"])
    ei = data.edge_index[:, keep]

    def layer(h: torch.Tensor, i: int) -> torch.Tensor:
        h = h @ params[f"convs.{i}.lin.weight"].t()
        out = torch.zeros_like(h).index_add_(0, ei[1], h[ei[0]] * weight.unsqueeze(1))
        return out + h / degree.unsqueeze(1) + params[f"convs.{i}.bias"]

    losses = []
    for _ in range(EPOCHS):
        optimizer.zero_grad()
        logits = layer(torch.relu(layer(x, 0)), 1)
        loss = F.cross_entropy(logits[mask], data.y[mask])
        loss.backward()
        losses.append(loss.detach())
        optimizer.step()
    for r in results:
        torch.testing.assert_close(r["losses"], torch.stack(losses), rtol=1e-9, atol=1e-10)
    assert to_undirected(ei).size(1) == ei.size(1)  # the reference graph stays symmetric


def test_sampled_training_moves_and_evaluation_stays_exact(bns_runs) -> None:
    vanilla, sampled = bns_runs["synthetic/0"], bns_runs["synthetic/3"]
    assert not torch.allclose(vanilla[0]["losses"][1:], sampled[0]["losses"][1:])
    assert torch.isfinite(sampled[0]["losses"]).all()


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_rate_is_rejected(p: float) -> None:
    with pytest.raises(ConfigError, match="sampling-rate"):
        TrainConfig(sampling_rate=p).validate()


def test_sampling_cuts_the_bytes_that_travel(tmp_path: Path) -> None:
    """Through the CLI: bytes at p = 0.1 are about a tenth of p = 1; sampling time is reported."""
    import json

    from bns_pipe.data import load_dataset
    from bns_pipe.partition import partition
    from tests.test_failures import train

    data = load_dataset("synthetic", num_nodes=3000, num_features=16, num_classes=4)
    partition(data, 2, tmp_path / "p", method="random", verbose=False)
    sent = {}
    for p in ("1.0", "0.1"):
        metrics = tmp_path / f"{p}.jsonl"
        done = train(
            "--partition-dir",
            str(tmp_path / "p"),
            "--epochs",
            "4",
            "--sampling-rate",
            p,
            "--metrics-jsonl",
            str(metrics),
        )
        assert done.returncode == 0, done.stderr
        epochs = [json.loads(x) for x in metrics.read_text().splitlines() if '"epoch"' in x]
        sent[p] = sum(r["comm_bytes"] for r in epochs)
        assert all((r["sample_s"] > 0) == (p == "0.1") for r in epochs)
    assert 0.07 < sent["0.1"] / sent["1.0"] < 0.13


def _aggregation_worker(rank: int, world: int, part_dir: Path, out: Path, epochs: int) -> None:
    """Per epoch: sampled GCN aggregation and its input gradient, through LocalGraph."""
    from bns_pipe.partition import load_partition
    from bns_pipe.sampling import BoundarySampler
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.views import build_view

    ctx = init_distributed("gloo", "cpu", 1, 60)
    part = load_partition(part_dir, rank)
    view = build_view(part, ctx, [], torch.float64)
    graph = view.graph
    gen = torch.Generator().manual_seed(0)
    x_all, w_all = torch.randn(2, 400, 3, generator=gen, dtype=torch.float64)
    x, w = x_all[part.inner_global_ids], w_all[part.inner_global_ids]
    sampler = BoundarySampler(3, rank, world, part.send_ids, part.halo_counts, 0.3)

    def run(sample, scale: float) -> torch.Tensor:
        graph.use_sample(sample, scale)
        xr = x.clone().requires_grad_(True)
        out = graph.aggregate(xr, "gcn", layer=0)
        (out * w).sum().backward()
        return torch.cat([out.detach(), xr.grad], 1)

    full = run(None, 1.0)
    results = {"full": full}
    for name, scale in (("unbiased", sampler.scale), ("unscaled", 1.0)):
        draws = torch.stack([run(sampler.sample(e), scale) for e in range(epochs)])
        results[name] = torch.stack([draws.mean(0), draws.std(0)])
    torch.save(results, out / f"rank_{rank}.pt")
    shutdown()


def test_mean_sampled_aggregation_is_the_full_aggregation(tmp_path: Path) -> None:
    """Over many epochs the mean of the sampled A x (and of its gradient Aᵀ w) approaches the
    full one within 6 standard errors; without the 1/p scale it does not (the test's power)."""
    from bns_pipe.data import load_dataset
    from bns_pipe.partition import partition
    from tests.distributed import run_ranks

    epochs = 300
    data = load_dataset("synthetic", num_nodes=400, num_features=4, num_classes=3)
    partition(data, 2, tmp_path / "p", method="random", verbose=False)
    run_ranks(_aggregation_worker, 2, tmp_path / "p", tmp_path, epochs, timeout=180)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank_{rank}.pt", weights_only=True)
        z = {}
        for name in ("unbiased", "unscaled"):
            mean, std = res[name]
            sampled = std > 0  # entries that touch the halo
            assert sampled.float().mean() > 0.5
            z[name] = ((mean - res["full"]).abs() / (std / epochs**0.5))[sampled]
            torch.testing.assert_close(mean[~sampled], res["full"][~sampled])
        assert z["unbiased"].max() < 6, z["unbiased"].max()
        assert z["unscaled"].max() > 20, z["unscaled"].max()
