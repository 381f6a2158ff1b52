"""Input features: row normalisation, the sparse (CSR) first layer and its dropout.

The sparse path must be the dense path stored differently: the same dropout mask, the same
logits and weight gradients to float rounding. (The gold test runs Cora, whose features
``--sparse-features auto`` stores sparse, against PyG on 1, 2 and 4 ranks.)
"""

from __future__ import annotations

import pytest
import torch

from bns_pipe.data import load_dataset
from bns_pipe.errors import ConfigError
from bns_pipe.graph import LocalGraph
from bns_pipe.nn.dropout import keyed_dropout, keyed_dropout_csr
from bns_pipe.nn.features import prepare_features, row_normalize, wants_sparse
from bns_pipe.nn.model import GNN
from bns_pipe.partition import load_partition, partition
from bns_pipe.sparse import CSR
from bns_pipe.train.config import TrainConfig


def bag_of_words(n: int, f: int, density: float, seed: int = 0) -> torch.Tensor:
    """Non-negative word counts, about ``density`` nonzero, with one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (n, f), generator=g).double()
    x = counts * (torch.rand(n, f, generator=g) < density)
    x[3] = 0
    return x


def dense(m: CSR) -> torch.Tensor:
    out = torch.zeros(m.shape, dtype=m.values.dtype)
    out[m.row_ids(), m.indices] = m.values
    return out


def test_row_normalize() -> None:
    x = bag_of_words(50, 40, 0.2)
    y = row_normalize(x)
    sums = y.sum(1)
    assert torch.allclose(sums[x.sum(1) > 0], torch.ones(1, dtype=y.dtype))
    assert sums[3] == 0 and not y.isnan().any()
    assert torch.equal(y * x.sum(1, keepdim=True), x.where(x.sum(1, keepdim=True) > 0, 0.0))
    with pytest.raises(ConfigError, match="non-negative"):
        row_normalize(-x)


def test_wants_sparse() -> None:
    assert wants_sparse("auto", 0.01, 1000, 64, use_pp=False)
    assert not wants_sparse("auto", 0.5, 1000, 64, use_pp=False)  # dense features
    assert not wants_sparse("auto", 0.01, 32, 64, use_pp=False)  # narrow input: aggregate first
    assert not wants_sparse("auto", 0.01, 1000, 64, use_pp=True)
    assert not wants_sparse("off", 0.01, 1000, 64, use_pp=False)
    assert wants_sparse("on", 0.9, 1000, 64, use_pp=False)
    for in_dim, use_pp in ((32, False), (1000, True)):
        with pytest.raises(ConfigError, match="--sparse-features on"):
            wants_sparse("on", 0.01, in_dim, 64, use_pp)
    with pytest.raises(ConfigError, match="--sparse-features"):
        TrainConfig(sparse_features="yes").validate()


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_sparse_dropout_is_the_dense_mask(p: float, native: bool, monkeypatch) -> None:
    """The stored entries take the dense mask, through the C++ op and the fallback, and only
    the kept ones stay stored (in x and in its transpose)."""
    if not native:
        from bns_pipe import _ext

        monkeypatch.setattr(_ext, "available", lambda: False)
    x = bag_of_words(60, 37, 0.1)
    row_ids = torch.randperm(1000)[:60]  # global ids of a rank's rows
    csr = prepare_features(x, normalize=False, sparse=True)
    # each epoch's key, and other row ids, on the same x (whose entry counters are cached)
    for key, ids in ((12345, row_ids), (777, row_ids), (12345, row_ids.flip(0))):
        expected = keyed_dropout(x, p, key, ids)
        again = keyed_dropout_csr(csr, p, key=key, row_ids=ids)
        assert torch.equal(dense(again), expected)
        assert torch.equal(dense(again.transpose()), expected.t())
        kept = int((expected != 0).sum())  # stored compact: the dropped entries are gone
        assert again.nnz == again.transpose().nnz == kept and bool((again.values != 0).all())
    dropped = keyed_dropout_csr(csr, p, key=12345, row_ids=row_ids)
    expected = keyed_dropout(x, p, 12345, row_ids)
    if 0 < p < 1:
        kept = (dense(dropped) != 0).sum() / (x != 0).sum()
        assert abs(kept - (1 - p)) < 0.1


def test_sparse_dropout_op_refuses_columns_outside_its_counters() -> None:
    """The C++ op reads a counter per column: an index past them is an error, not a read
    outside the tensor."""
    from bns_pipe import _ext

    if not _ext.available():
        pytest.skip("the C++ extension is not built")
    words = bag_of_words(8, 5, 0.5)
    words[:, 4] = 1.0  # the last column is stored
    x = prepare_features(words, normalize=False, sparse=True)
    rows, cols = torch.arange(8) * 5, torch.arange(4)  # one column short
    with pytest.raises(RuntimeError, match="outside col_base"):
        _ext.ops().keyed_dropout_csr(x.indptr, x.indices, x.values, 1, rows, cols, 1 << 23, 2.0)


@pytest.fixture(scope="module")
def sparse_graph(tmp_path_factory) -> tuple[LocalGraph, torch.Tensor, int]:
    """A one-part synthetic graph whose features are replaced by sparse word counts."""
    data = load_dataset("synthetic", num_nodes=400, num_features=8, num_classes=4)
    data.x = bag_of_words(data.num_nodes, 300, 0.03, seed=1)
    out = tmp_path_factory.mktemp("features") / "parts"
    partition(data, 1, out, verbose=False)
    part = load_partition(out, 0)
    return LocalGraph(part, dtype=torch.float64), part.x.double(), data.num_classes


@pytest.mark.parametrize("conv", ["gcn", "sage"])
@pytest.mark.parametrize("training", [True, False])
def test_sparse_first_layer_equals_dense(sparse_graph, conv: str, training: bool) -> None:
    graph, x, num_classes = sparse_graph
    torch.manual_seed(0)
    model = GNN(x.size(1), 16, num_classes, layers=2, conv=conv, dropout=0.5, seed=3).double()
    model.train(training)
    outputs = []
    for features in (x, prepare_features(x, normalize=True, sparse=False)):
        for sparse in (False, True):
            model.zero_grad()
            logits = model(graph, prepare_features(features, False, sparse), epoch=2)
            (logits**2).sum().backward()
            grads = [p.grad.clone() for p in model.parameters()]
            outputs.append((logits.detach(), grads))
    for (dense_out, dense_grads), (sparse_out, sparse_grads) in (outputs[:2], outputs[2:]):
        torch.testing.assert_close(sparse_out, dense_out, rtol=1e-12, atol=1e-12)
        for a, b in zip(sparse_grads, dense_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(outputs[0][0], outputs[2][0])  # normalisation changed the input
