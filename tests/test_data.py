"""Dataset loaders, the canonical-form checks, the synthetic generator and the dataset CLI.

Real datasets are read from ``$BNS_PIPE_DATA`` (the Makefile points it at the shared
datasets); tests that need one skip when it is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_geometric.data import Data

from bns_pipe.data import (
    DATASETS,
    add_dataset_arguments,
    dataset_spec_from_args,
    load_dataset,
    load_dataset_spec,
    validate_data,
)
from bns_pipe.data.npz import per_class_split
from bns_pipe.data.synthetic import _inverse_cdf
from bns_pipe.errors import DatasetError


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Process PyG / OGB datasets into a throwaway cache, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BNS_PIPE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setenv("OUTDATED_IGNORE", "1")
        mp.delenv("BNS_PIPE_TRUST_RAW", raising=False)
        yield


def shared_root(*needed: str) -> Path:
    """The shared datasets folder, or skip the test when it (or a ``needed`` file) is absent."""
    root = os.environ.get("BNS_PIPE_DATA")
    if not root:
        pytest.skip("BNS_PIPE_DATA is not set: no root holds the shared real datasets")
    for name in needed:
        if not (Path(root) / name).exists():
            pytest.skip(f"{Path(root) / name} is absent")
    return Path(root)


_LOADED: dict[str, Data] = {}


def shared(name: str, file: str) -> Data:
    if name not in _LOADED:
        _LOADED[name] = load_dataset(name, root=shared_root(file))
    return _LOADED[name]


def assert_canonical(data: Data) -> None:
    """Every invariant of the canonical form (bns_pipe.data.validate)."""
    n = data.num_nodes
    assert data.x.dtype == torch.float32 and data.x.layout == torch.strided
    assert data.x.dim() == 2 and data.x.size(0) == n
    assert data.y.dtype == torch.int64
    assert data.y.shape == ((n, data.num_classes) if data.multilabel else (n,))
    assert isinstance(data.num_classes, int) and isinstance(data.multilabel, bool)
    masks = [data.train_mask, data.val_mask, data.test_mask]
    assert all(m.dtype == torch.bool and m.shape == (n,) for m in masks)
    assert int(sum(m.long() for m in masks).max()) <= 1, "masks overlap"
    ei = data.edge_index
    assert ei.dtype == torch.int64 and ei.dim() == 2 and ei.size(0) == 2
    src, dst = ei
    key = src * n + dst
    assert bool((key[1:] > key[:-1]).all()), "not sorted by (src, dst) or duplicated"
    assert not bool((src == dst).any()), "self-loops"
    assert torch.equal(torch.sort(dst * n + src).values, key), "not symmetric"


# Real datasets: counts of datasets/README.md ------------------------------------------------

REAL = {
    # name: (file or folder, nodes, edge_index columns, features, classes, (train, val, test))
    "cora": ("planetoid/Cora/raw", 2708, 10556, 1433, 7, (140, 500, 1000)),
    "citeseer": ("planetoid/CiteSeer/raw", 3327, 9104, 3703, 6, (120, 500, 1000)),
    "coauthor-cs": ("coauthor-cs.npz", 18333, 163788, 6805, 15, (300, 450, 17583)),
    "coauthor-physics": ("coauthor-physics.npz", 34493, 495924, 8415, 5, (100, 150, 34243)),
    "amazon-computers": ("amazon-computers.npz", 13752, 491722, 767, 10, (200, 300, 13252)),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_dataset_counts_and_invariants(name):
    file, nodes, edges, features, classes, split = REAL[name]
    data = shared(name, file)
    assert (data.num_nodes, data.edge_index.size(1)) == (nodes, edges)
    assert (data.x.size(1), data.num_classes, data.multilabel) == (features, classes, False)
    sizes = tuple(int(m.sum()) for m in (data.train_mask, data.val_mask, data.test_mask))
    assert sizes == split
    assert_canonical(data)


def test_coauthor_features_binarised_as_pyg_and_npz_paths_as_stored():
    """Named Coauthor datasets binarise the keyword counts (as PyG's loader); ``npz:PATH``
    uses the stored values (counts up to 105, datasets/README.md)."""
    named = shared("coauthor-cs", "coauthor-cs.npz")
    stored = load_dataset("npz:" + str(shared_root("coauthor-cs.npz") / "coauthor-cs.npz"))
    assert float(stored.x.max()) == 105.0
    assert torch.equal(named.x, (stored.x > 0).float())


def test_per_class_split_rule_and_seed():
    data = shared("amazon-computers", "amazon-computers.npz")
    for mask, per_class in ((data.train_mask, 20), (data.val_mask, 30)):
        assert torch.bincount(data.y[mask], minlength=10).tolist() == [per_class] * 10
    root = shared_root("amazon-computers.npz")
    again = load_dataset("amazon-computers", root=root, data_seed=0)
    other = load_dataset("amazon-computers", root=root, data_seed=1)
    assert torch.equal(again.train_mask, data.train_mask)
    assert torch.equal(again.val_mask, data.val_mask)
    assert not torch.equal(other.train_mask, data.train_mask)


def test_per_class_split_small_classes_and_unlabelled():
    y = torch.tensor([0] * 60 + [1] * 25 + [2] * 10 + [-1] * 5)
    masks = per_class_split(y, 20, 30, seed=3)
    train, val, test = masks["train_mask"], masks["val_mask"], masks["test_mask"]
    assert torch.bincount(y[train]).tolist() == [20, 20, 10]
    assert torch.bincount(y[val], minlength=3).tolist() == [30, 5, 0]
    assert torch.bincount(y[test], minlength=3).tolist() == [10, 0, 0]
    assert not bool((train | val | test)[y < 0].any())


# .npz files built here ----------------------------------------------------------------------


def write_npz(path: Path, n: int = 120, seed: int = 0, **extra) -> Path:
    """A small graph in the .npz format: CSR features, 3 classes, random edges."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 7)) < 0.3) * rng.integers(1, 5, (n, 7))
    rows, cols = np.nonzero(x)
    arrays = {
        "edge_index": rng.integers(0, n, (2, 4 * n)),
        "x_indptr": np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]),
        "x_indices": cols.astype(np.int32),
        "x_data": x[rows, cols].astype(np.float32),
        "x_shape": np.array([n, 7]),
        "y": np.arange(n) % 3,
    }
    arrays.update(extra)
    np.savez_compressed(path, **arrays)
    return path


def test_npz_csr_features_and_split_depend_only_on_data_seed(tmp_path):
    a = load_dataset(f"npz:{write_npz(tmp_path / 'a.npz', seed=0)}", data_seed=5)
    rng = np.random.default_rng(0)
    dense = (rng.random((120, 7)) < 0.3) * rng.integers(1, 5, (120, 7))
    assert torch.equal(a.x, torch.from_numpy(dense.astype(np.float32)))
    assert_canonical(a)
    # Other edges and features, same labels and seed: same split; another seed: another split.
    b = load_dataset(f"npz:{write_npz(tmp_path / 'b.npz', seed=1)}", data_seed=5)
    c = load_dataset(f"npz:{tmp_path / 'b.npz'}", data_seed=6)
    assert torch.equal(a.train_mask, b.train_mask) and torch.equal(a.val_mask, b.val_mask)
    assert not torch.equal(b.train_mask, c.train_mask)


def test_npz_dense_x_and_stored_masks(tmp_path):
    n = 90
    splits = np.zeros((3, n), dtype=bool), np.zeros((3, n), dtype=bool), np.zeros((3, n), bool)
    for s in range(3):
        splits[0][s, s * 10 : s * 10 + 10] = True
        splits[1][s, 50 + s : 60 + s] = True
        splits[2][s, 70:] = True
    x = np.random.default_rng(0).random((n, 4))
    arrays = {"x": x, "train_mask": splits[0], "val_mask": splits[1], "test_mask": splits[2]}
    path = write_npz(tmp_path / "s.npz", n=n, **arrays)
    data = load_dataset(f"npz:{path}", split_index=2)
    assert torch.equal(data.x, torch.from_numpy(x).float())
    assert torch.equal(data.train_mask, torch.from_numpy(splits[0][2]))
    assert torch.equal(data.val_mask, torch.from_numpy(splits[1][2]))
    with pytest.raises(DatasetError, match="split_index 3 is out of range"):
        load_dataset(f"npz:{path}", split_index=3)

    one = {key: value[1] for key, value in arrays.items() if key != "x"}
    path = write_npz(tmp_path / "one.npz", n=n, **one)
    assert torch.equal(load_dataset(f"npz:{path}").train_mask, torch.from_numpy(one["train_mask"]))
    with pytest.raises(DatasetError, match="out of range"):
        load_dataset(f"npz:{path}", split_index=1)


def test_npz_corrupt_and_malformed_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(os.urandom(4096))
    good = write_npz(tmp_path / "good.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(DatasetError, match=re.escape(str(path))):
            load_dataset(f"npz:{path}")
    no_y = tmp_path / "no_y.npz"
    np.savez(no_y, edge_index=np.zeros((2, 1), dtype=np.int64), x=np.zeros((3, 2)))
    with pytest.raises(DatasetError, match="missing array 'y'"):
        load_dataset(f"npz:{no_y}")
    bad_y = write_npz(tmp_path / "bad_y.npz", y=np.zeros(5, dtype=np.int64))
    with pytest.raises(DatasetError, match="y must be"):
        load_dataset(f"npz:{bad_y}")


# Synthetic ----------------------------------------------------------------------------------


def test_synthetic_is_deterministic_in_data_seed():
    a, b = (load_dataset("synthetic", num_nodes=4000, data_seed=1) for _ in range(2))
    c = load_dataset("synthetic", num_nodes=4000, data_seed=2)
    for key in ("x", "y", "edge_index", "train_mask", "val_mask", "test_mask"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a.y, c.y) and not torch.equal(a.train_mask, c.train_mask)
    assert a.edge_index.shape != c.edge_index.shape or not torch.equal(a.edge_index, c.edge_index)


def test_synthetic_size_degree_and_split():
    data = load_dataset("synthetic", num_nodes=20_000, avg_degree=10, num_features=12)
    assert_canonical(data)
    assert data.x.shape == (20_000, 12) and data.num_classes == 8
    assert 0.9 * 10 <= data.edge_index.size(1) / 20_000 <= 10
    degree = torch.bincount(data.edge_index[0], minlength=20_000)
    assert int(degree.max()) > 10 * 10, "power-law degrees should make hubs"
    sizes = [int(m.sum()) for m in (data.train_mask, data.val_mask, data.test_mask)]
    assert sizes == [2000, 2000, 16000]
    assert torch.bincount(data.y).min() > 20_000 / 8 * 0.9


def test_synthetic_inverse_cdf_matches_searchsorted():
    rng = np.random.default_rng(0)
    cum = np.cumsum(rng.pareto(1.5, 10_000) + 1.0)
    u = np.concatenate([rng.random(1_000_000) * cum[-1], cum[:-1], [0.0]])
    assert np.array_equal(_inverse_cdf(cum, u), np.searchsorted(cum, u, side="right"))


def _fit(data: Data, gcn: bool, epochs: int = 100) -> float:
    """Test accuracy of a 2-layer GCN (PyG GCNConv) or of an MLP on the features alone."""
    from torch_geometric.nn import GCNConv
    from torch_geometric.utils import to_torch_csr_tensor

    torch.manual_seed(0)
    f, c = data.x.size(1), data.num_classes
    if gcn:
        layers = torch.nn.ModuleList([GCNConv(f, 64, cached=True), GCNConv(64, c, cached=True)])
        with warnings.catch_warnings():  # torch's sparse-CSR "beta" notice
            warnings.simplefilter("ignore")
            adj = to_torch_csr_tensor(data.edge_index, size=(data.num_nodes, data.num_nodes))
        args = (adj,)
    else:
        layers, args = torch.nn.ModuleList([torch.nn.Linear(f, 64), torch.nn.Linear(64, c)]), ()
    optimizer = torch.optim.Adam(layers.parameters(), lr=0.01, weight_decay=5e-4)

    def forward(training: bool) -> torch.Tensor:
        h = F.dropout(F.relu(layers[0](data.x, *args)), 0.5, training)
        return layers[1](h, *args)

    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(forward(True)[data.train_mask], data.y[data.train_mask]).backward()
        optimizer.step()
    with torch.no_grad():
        pred = forward(False).argmax(1)
    return float((pred[data.test_mask] == data.y[data.test_mask]).float().mean())


def test_synthetic_is_learnable_by_gcn_but_not_trivially():
    data = load_dataset("synthetic", num_nodes=3000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small kernels: extra threads only add contention
    start = time.perf_counter()
    try:
        gcn, mlp = _fit(data, gcn=True), _fit(data, gcn=False)
    finally:
        torch.set_num_threads(threads)
    chance = 1 / data.num_classes
    assert 2 * chance < gcn < 0.98, gcn
    assert gcn > mlp + 0.2, (gcn, mlp)
    assert time.perf_counter() - start < 20


# validate_data on user graphs ----------------------------------------------------------------


def user_graph(**overrides) -> Data:
    n = 6
    fields = {
        "x": torch.arange(n * 2).view(n, 2),  # int: cast to float32
        "y": torch.tensor([0, 1, 2, 0, 1, 2]),
        # Directed, a self-loop (3, 3), a duplicate (0, 1) twice, and (1, 0) present already.
        "edge_index": torch.tensor([[0, 0, 1, 3, 4, 2, 0], [1, 1, 0, 3, 5, 4, 1]]),
        "train_mask": torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool),
        "val_mask": torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool),
        "test_mask": torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool),
    }
    fields.update(overrides)
    return Data(**{k: v for k, v in fields.items() if v is not None})


def test_validate_data_repairs_a_directed_graph(caplog):
    with caplog.at_level(logging.WARNING, logger="bns_pipe.data.validate"):
        data = validate_data(user_graph(), "mine")
    expected = [[0, 1, 2, 4, 4, 5], [1, 0, 4, 2, 5, 4]]
    assert data.edge_index.tolist() == expected
    assert data.x.dtype == torch.float32 and data.num_classes == 3 and data.multilabel is False
    assert_canonical(data)
    (record,) = caplog.records
    assert record.getMessage() == (
        "mine: canonicalised edge_index: 2 reverse edges added, 1 self-loops dropped, "
        "2 duplicate edges dropped"
    )
    caplog.clear()
    assert validate_data(data).edge_index is data.edge_index  # canonical: kept, no notice
    assert not caplog.records


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"edge_index": torch.tensor([[0], [6]])}, r"ids in \[0, 6\], need \[0, 6\)"),
        ({"edge_index": torch.tensor([[0.0], [1.0]])}, "must be integer"),
        ({"edge_index": torch.tensor([0, 1])}, r"must be \(2, E\)"),
        ({"val_mask": None}, "val_mask is missing"),
        ({"test_mask": torch.ones(6, dtype=torch.uint8)}, "must be bool"),
        ({"train_mask": torch.zeros(5, dtype=torch.bool)}, r"must be \(6,\)"),
        ({"train_mask": torch.zeros(6, dtype=torch.bool)}, "selects no node"),
        ({"test_mask": torch.ones(6, dtype=torch.bool)}, "overlap"),
        ({"y": torch.zeros(6, 2, dtype=torch.long)}, "multilabel = True"),
        ({"y": torch.tensor([0, -1, 2, 0, 1, 2])}, "label -1"),
        ({"y": torch.rand(6)}, "integer class ids"),
        ({"x": None}, "features data.x are missing"),
        ({"x": torch.full((6, 2), float("nan"))}, "NaN"),
        ({"edge_attr": torch.ones(7, 1)}, "edge features"),
    ],
)
def test_validate_data_rejects(override, message):
    with pytest.raises(DatasetError, match=message):
        validate_data(user_graph(**override))


def test_validate_data_num_classes_and_multilabel():
    data = user_graph()
    data.num_classes = 5
    assert validate_data(data).num_classes == 5
    data.num_classes = 2
    with pytest.raises(DatasetError, match="labels need 3"):
        validate_data(data)
    multi = user_graph(y=torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]]))
    multi.multilabel = True
    out = validate_data(multi)
    assert out.multilabel is True and out.num_classes == 2 and out.y.shape == (6, 2)


def test_validate_data_is_vectorised():
    n, e = 1_000_000, 4_000_000
    gen = torch.Generator().manual_seed(0)
    data = Data(
        x=torch.zeros(n, 1),
        y=torch.zeros(n, dtype=torch.long),
        edge_index=torch.randint(0, n, (2, e), generator=gen),
        train_mask=torch.ones(n, dtype=torch.bool),
        val_mask=torch.zeros(n, dtype=torch.bool),
        test_mask=torch.zeros(n, dtype=torch.bool),
    )
    start = time.perf_counter()
    out = validate_data(data)
    assert time.perf_counter() - start < 15
    assert 2 * e * 0.99 < out.edge_index.size(1) <= 2 * e


# Missing, tampered and unknown datasets -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cora", "planetoid/Cora/raw"),
        ("pubmed", "planetoid/PubMed/raw"),
        ("coauthor-cs", "coauthor-cs.npz"),
        ("reddit", "reddit/raw"),
        ("ogbn-arxiv", "ogbn_arxiv"),
        ("ogbn-papers100M", "ogbn_papers100M"),
    ],
)
def test_missing_data_fails_fast_naming_the_path(tmp_path, name, expected):
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / expected))):
        load_dataset(name, root=tmp_path)
    assert time.perf_counter() - start < 5
    assert list(tmp_path.iterdir()) == [], "the root must not be written"


def _copy_cora(tmp_path: Path) -> Path:
    raw = shared_root("planetoid/Cora/raw") / "planetoid" / "Cora" / "raw"
    target = tmp_path / "planetoid" / "Cora" / "raw"
    shutil.copytree(raw, target)
    return target


def test_planetoid_processes_outside_the_root(tmp_path):
    _copy_cora(tmp_path)
    data = load_dataset("cora", root=tmp_path)
    assert data.num_nodes == 2708
    assert sorted(p.name for p in (tmp_path / "planetoid" / "Cora").iterdir()) == ["raw"]


def test_planetoid_tampered_raw_file_is_refused(tmp_path):
    raw = _copy_cora(tmp_path)
    graph = raw / "ind.cora.graph"
    blob = bytearray(graph.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    graph.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match=re.escape(f"{graph}: SHA-256 checksum mismatch")):
        load_dataset("cora", root=tmp_path)


def test_unknown_dataset_and_options():
    with pytest.raises(DatasetError, match="supported: synthetic, coauthor-cs"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="unknown option"):
        load_dataset("synthetic", split_index=1)
    with pytest.raises(DatasetError, match="takes none"):
        load_dataset("cora", data_seed=1)


# PyG / OGB classes on tiny stand-ins in their raw layouts --------------------------------------


def _fake_raw(root: Path) -> None:
    """Reddit, Yelp (multilabel) and ogbn-arxiv raw files for a 40-node graph."""
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    n = 40
    edges = rng.integers(0, n, (2, 150))
    role = np.repeat([1, 2, 3], [16, 8, 16])
    (root / "reddit" / "raw").mkdir(parents=True)
    np.savez(
        root / "reddit" / "raw" / "reddit_data.npz",
        feature=rng.random((n, 5), dtype=np.float32),
        label=np.arange(n) % 4,
        node_types=role,
    )
    adj = sp.coo_matrix((np.ones(150), (edges[0], edges[1])), shape=(n, n))
    sp.save_npz(root / "reddit" / "raw" / "reddit_graph.npz", adj)

    yelp = root / "yelp" / "raw"
    yelp.mkdir(parents=True)
    csr = adj.tocsr()
    np.savez(
        yelp / "adj_full.npz",
        data=csr.data,
        indices=csr.indices,
        indptr=csr.indptr,
        shape=csr.shape,
    )
    np.save(yelp / "feats.npy", rng.random((n, 5)))
    labels = {str(i): [int(i % 2), int(i % 3 == 0), 1] for i in range(n)}
    (yelp / "class_map.json").write_text(json.dumps(labels))
    split = {"tr": list(range(16)), "va": list(range(16, 24)), "te": list(range(24, n))}
    (yelp / "role.json").write_text(json.dumps(split))

    arxiv = root / "ogbn_arxiv"
    (arxiv / "raw").mkdir(parents=True)
    (arxiv / "split" / "time").mkdir(parents=True)
    (arxiv / "RELEASE_v1.txt").write_text("ogbn-arxiv\n")

    def csv(path: Path, array) -> None:
        pd.DataFrame(array).to_csv(path, header=False, index=False, compression="gzip")

    csv(arxiv / "raw" / "edge.csv.gz", edges.T)
    csv(arxiv / "raw" / "num-node-list.csv.gz", [n])
    csv(arxiv / "raw" / "num-edge-list.csv.gz", [150])
    csv(arxiv / "raw" / "node-feat.csv.gz", rng.random((n, 5), dtype=np.float32))
    csv(arxiv / "raw" / "node-label.csv.gz", (np.arange(n) % 4)[:, None])
    csv(arxiv / "raw" / "node_year.csv.gz", np.full((n, 1), 2020))
    for part, nodes in (("train", split["tr"]), ("valid", split["va"]), ("test", split["te"])):
        csv(arxiv / "split" / "time" / f"{part}.csv.gz", nodes)


def test_pyg_and_ogb_classes_read_their_raw_layout(tmp_path):
    _fake_raw(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    reddit = load_dataset("reddit", root=tmp_path)
    yelp = load_dataset("yelp", root=tmp_path)
    arxiv = load_dataset("ogbn-arxiv", root=tmp_path)
    assert sorted(p for p in tmp_path.rglob("*")) == before, "the root must not be written"
    for data in (reddit, yelp, arxiv):
        assert_canonical(data)
        assert data.num_nodes == 40
        assert [int(m.sum()) for m in (data.train_mask, data.val_mask, data.test_mask)] == [
            16,
            8,
            16,
        ]
    assert torch.equal(reddit.edge_index, arxiv.edge_index)  # the same directed edges
    assert (reddit.num_classes, reddit.multilabel) == (4, False)
    assert (yelp.num_classes, yelp.multilabel, yelp.y.shape) == (3, True, (40, 3))
    assert arxiv.num_classes == 40 and torch.equal(arxiv.y, torch.arange(40) % 4)


# Command line and specs -------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    return parser.parse_args(argv)


def test_dataset_spec_from_args():
    spec = dataset_spec_from_args(parse())
    assert spec == {
        "name": "synthetic",
        "options": {
            "avg_degree": 16.0,
            "data_seed": 0,
            "num_classes": 8,
            "num_features": 64,
            "num_nodes": 50000,
        },
    }
    assert json.loads(json.dumps(spec)) == spec
    assert list(spec["options"]) == sorted(spec["options"])
    assert dataset_spec_from_args(parse("--dataset", "cora", "--data-seed", "3")) == {
        "name": "cora",
        "options": {},
    }
    spec = dataset_spec_from_args(parse("--dataset", "coauthor-cs", "--split-index", "2"))
    assert spec == {"name": "coauthor-cs", "options": {"data_seed": 0, "split_index": 2}}
    spec = dataset_spec_from_args(parse("--dataset", "npz:some/file.npz"))
    assert spec["name"] == f"npz:{Path('some/file.npz').resolve()}"
    assert set(DATASETS) >= {"synthetic", "cora", "reddit", "ogbn-papers100M"}


def test_dataset_arguments_validate_the_name(capsys):
    with pytest.raises(SystemExit):
        parse("--dataset", "nope")
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser.add_argument_group("data"), required=True)
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_load_dataset_spec_round_trip():
    args = parse("--num-nodes", "500", "--num-features", "4", "--data-seed", "7")
    spec = json.loads(json.dumps(dataset_spec_from_args(args)))
    data = load_dataset_spec(spec)
    direct = load_dataset("synthetic", num_nodes=500, num_features=4, data_seed=7)
    assert torch.equal(data.x, direct.x) and torch.equal(data.edge_index, direct.edge_index)
    with pytest.raises(DatasetError, match="a dataset spec is"):
        load_dataset_spec({"options": {}})
