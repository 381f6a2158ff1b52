"""GAT: the fused attention op against PyG's ``GATConv``, C++ against the fallback, keyed
attention dropout, and the options that do not fit GAT.

The distributed equalities (1, 2 and 4 ranks against PyG, BNS p = 1 against vanilla) run in
``test_gold.py`` and ``test_bns.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch_geometric.nn as pyg
from torch_geometric.utils import to_undirected

from bns_pipe import _ext
from bns_pipe.data import validate_data
from bns_pipe.errors import ConfigError
from bns_pipe.graph import LocalGraph
from bns_pipe.nn.attention import gat_attention
from bns_pipe.nn.conv import GATConv
from bns_pipe.nn.model import GNN
from bns_pipe.partition import load_partition, partition
from bns_pipe.sparse import CSR
from bns_pipe.train.config import TrainConfig

needs_ext = pytest.mark.skipif(not _ext.available(), reason="C++ extension not built")


def random_graph(n: int, edges: int, seed: int):
    """A symmetric graph without self-loops, with some isolated nodes."""
    from torch_geometric.data import Data

    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, n - 3, (2, edges), generator=gen)  # the last 3 isolated
    edge_index = to_undirected(edge_index[:, edge_index[0] != edge_index[1]], num_nodes=n)
    x = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    split = torch.arange(n) % 3
    masks = {f"{s}_mask": split == i for i, s in enumerate(("train", "val", "test"))}
    return validate_data(Data(x=x, edge_index=edge_index, y=y, num_nodes=n, **masks))


@pytest.mark.parametrize("heads, concat", [(1, True), (3, True), (3, False)])
def test_conv_equals_pyg_gatconv(tmp_path: Path, heads: int, concat: bool) -> None:
    """One layer on a one-part graph: output and every gradient equal PyG's (float64)."""
    data = random_graph(40, 120, seed=heads)
    partition(data, 1, tmp_path / "p", verbose=False)
    part = load_partition(tmp_path / "p", 0)
    graph = LocalGraph(part, dtype=torch.float64)
    ours = GATConv(6, 5, heads=heads, concat=concat).double()
    theirs = pyg.GATConv(6, 5, heads=heads, concat=concat).double()
    theirs.load_state_dict(ours.state_dict())
    x = part.x.double().requires_grad_()
    x_ref = data.x[part.inner_global_ids].double().requires_grad_()
    out = ours(graph, x, layer=0)
    # PyG on the graph in local order: relabel edge_index by the partition's permutation
    local_of = torch.empty_like(part.inner_global_ids)
    local_of[part.inner_global_ids] = torch.arange(part.n_inner)
    want = theirs(x_ref, local_of[data.edge_index])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    weight = torch.randn_like(want)
    (out * weight).sum().backward()
    (want * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def attention_inputs(dtype: torch.dtype, heads: int = 2, width: int = 3, seed: int = 0):
    """A random pattern with halo columns (n_cols > n_rows), inputs and shuffled global ids."""
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_cols = 30, 45
    mask = torch.rand(n_rows, n_cols, generator=gen) < 0.15
    mask[torch.arange(n_rows), torch.arange(n_rows)] = False  # self-loops are implicit
    mask[::7] = False  # rows with the self-loop only
    pattern = CSR.from_dense(mask.to(dtype)).with_values(None)
    src = torch.randn(n_cols, heads * (width + 1), generator=gen, dtype=dtype)
    a_dst = torch.randn(n_rows, heads, generator=gen, dtype=dtype)
    col_ids = torch.randperm(1000, generator=gen)[:n_cols]
    return pattern, src, a_dst, col_ids[:n_rows], col_ids


def run_attention(pattern, src, a_dst, row_ids, col_ids, p: float, heads: int = 2):
    src, a_dst = src.clone().requires_grad_(), a_dst.clone().requires_grad_()
    out = gat_attention(pattern, src, a_dst, heads, p, 1234, row_ids, col_ids)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    weight = weight.view_as(out)
    (out * weight).sum().backward()
    return out.detach(), src.grad, a_dst.grad


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_cpp_equals_fallback(monkeypatch, dtype: torch.dtype, p: float) -> None:
    inputs = attention_inputs(dtype)
    native = run_attention(*inputs, p)
    monkeypatch.setattr(_ext, "available", lambda: False)
    fallback = run_attention(*inputs, p)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    for a, b in zip(native, fallback, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("ext", [True, False], ids=["cpp", "fallback"])
def test_attention_dropout_is_keyed_by_global_ids(monkeypatch, ext: bool) -> None:
    """Reordering rows and columns (another partitioning) permutes the output, nothing more;
    dropout keeps about 1 - p of the coefficients, scaled by 1 / (1 - p)."""
    if ext and not _ext.available():
        pytest.skip("C++ extension not built")
    if not ext:
        monkeypatch.setattr(_ext, "available", lambda: False)
    pattern, src, a_dst, row_ids, col_ids = attention_inputs(torch.float64)
    out = gat_attention(pattern, src, a_dst, 2, 0.5, 99, row_ids, col_ids)
    # the same graph with rows (and their self-loop columns) reversed, halo columns shuffled
    n_rows, n_cols = pattern.shape
    new_of_old = torch.cat([torch.arange(n_rows).flip(0), n_rows + torch.randperm(n_cols - n_rows)])
    old_rows = new_of_old[:n_rows].argsort()
    dense = torch.zeros(pattern.shape, dtype=torch.float64)
    dense[pattern.row_ids(), pattern.indices] = 1
    moved = torch.zeros_like(dense)
    moved[:, new_of_old] = dense
    moved = CSR.from_dense(moved[old_rows]).with_values(None)
    old_cols = new_of_old.argsort()
    again = gat_attention(
        moved, src[old_cols], a_dst[old_rows], 2, 0.5, 99, row_ids[old_rows], col_ids[old_cols]
    )
    torch.testing.assert_close(again, out[old_rows])
    assert not torch.equal(out, gat_attention(pattern, src, a_dst, 2, 0.0))
    # the coefficients: z = identity-like rows expose each beta directly
    heads, width = 2, 3
    one_hot = torch.zeros(pattern.n_cols, heads * (width + 1), dtype=torch.float64)
    one_hot[:, :width] = 1.0  # head 0 sums its betas into every channel
    betas = gat_attention(pattern, one_hot, torch.zeros_like(a_dst), heads, 0.5, 7)[:, 0]
    softmax_sum = gat_attention(pattern, one_hot, torch.zeros_like(a_dst), heads)[:, 0]
    torch.testing.assert_close(softmax_sum, torch.ones_like(softmax_sum))
    # with equal logits every beta is 2 / degree or 0: the sum is 2 * kept / (degree + 1)
    degree = pattern.indptr.diff().double() + 1
    kept = betas * degree / 2
    torch.testing.assert_close(kept, kept.round())
    share = kept.sum() / degree.sum()
    assert 0.35 < float(share) < 0.65


def test_model_splits_hidden_over_heads() -> None:
    model = GNN(10, 64, 3, layers=3, conv="gat", heads=8)
    assert [c.heads for c in model.convs] == [8, 8, 1]
    assert [c.lin.weight.shape for c in model.convs] == [(64, 10), (64, 64), (3, 64)]
    assert model.convs[-1].bias.shape == (3,)
    with pytest.raises(ValueError, match="split evenly"):
        GNN(10, 60, 3, layers=2, conv="gat", heads=8)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"model": "gat", "hidden": 60, "heads": 8}, "split evenly"),
        ({"model": "gat", "heads": 0}, "at least 1"),
        ({"model": "gcn", "heads": 4}, "--model gat only"),
        ({"model": "gat", "use_pp": True}, "use-pp"),
    ],
)
def test_bad_gat_options_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).validate()


def test_dropout_training_does_not_depend_on_the_rank_count(tmp_path: Path) -> None:
    """Feature and attention dropout are keyed by global ids: 1 and 2 ranks train alike."""
    from tests.test_gold import run_world

    options = {"model": "gat", "heads": 2, "dropout": 0.5}
    one = run_world(1, [("synthetic", options)], tmp_path / "one")["synthetic/0"]
    two = run_world(2, [("synthetic", options)], tmp_path / "two")["synthetic/0"]
    torch.testing.assert_close(two[0]["losses"], one[0]["losses"], rtol=1e-9, atol=1e-10)
    by_id = torch.empty_like(one[0]["logits"])
    by_id[one[0]["ids"]] = one[0]["logits"]
    for r in two:
        torch.testing.assert_close(r["logits"], by_id[r["ids"]], rtol=1e-9, atol=1e-10)
    # and dropout did act: without it the first loss differs
    none = run_world(1, [("synthetic", {**options, "dropout": 0.0})], tmp_path / "none")
    assert not torch.allclose(none["synthetic/0"][0]["losses"], one[0]["losses"])
