"""Partitioner: exact reconstruction, halo/send-list agreement, METIS quality, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data

from bns_pipe import _ext
from bns_pipe.data import load_dataset, validate_data
from bns_pipe.errors import PartitionError
from bns_pipe.partition import load_partition, partition, read_manifest, verify_partition
from bns_pipe.partition.build import global_in_csr, local_csr
from bns_pipe.partition.store import part_file

REAL = ("cora", "citeseer", "coauthor-cs", "coauthor-physics", "amazon-computers")


def real_dataset(name: str) -> Data:
    root = os.environ.get("BNS_PIPE_DATA")
    if not root:
        pytest.skip("BNS_PIPE_DATA is not set: no root holds the shared real datasets")
    data = _cached(name, root)
    return data


_CACHE: dict[str, Data] = {}


def _cached(name: str, root: str) -> Data:
    if name not in _CACHE:
        data = load_dataset(name, root=root)
        data.x = data.x[:, :8].contiguous()  # structure tests do not need wide features
        _CACHE[name] = data
    return _CACHE[name]


def small_graph(n: int = 600, edges: int = 3000, seed: int = 0) -> Data:
    gen = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(0, n, (2, edges), generator=gen)
    train = torch.rand(n, generator=gen) < 0.2
    data = Data(
        x=torch.randn(n, 5, generator=gen),
        y=torch.randint(0, 3, (n,), generator=gen),
        edge_index=edge_index,
        train_mask=train,
        val_mask=torch.zeros(n, dtype=torch.bool),
        test_mask=~train,
    )
    return validate_data(data)


def check_partition(data: Data, directory: Path, k: int) -> None:
    """Every invariant a trainer relies on, checked against the original graph."""
    parts = [load_partition(directory, r) for r in range(k)]
    n = data.num_nodes
    owner = torch.full((n,), -1, dtype=torch.long)
    for p in parts:
        assert (owner[p.inner_global_ids] == -1).all(), "a node is inner in two parts"
        owner[p.inner_global_ids] = p.rank
    assert (owner >= 0).all(), "a node is inner in no part"

    edges = []
    in_degree = torch.bincount(data.edge_index[1], minlength=n)
    for p in parts:
        local = torch.cat([p.inner_global_ids, p.halo_global_ids])
        assert p.indices.numel() == 0 or int(p.indices.max()) < p.n_inner + p.n_halo
        rows = torch.repeat_interleave(torch.arange(p.n_inner), p.indptr.diff())
        assert not (p.indices == rows).any(), "self-loop stored"
        # Columns sorted within each row, so the inner block precedes the halo block.
        keys = rows * (p.n_inner + p.n_halo) + p.indices
        assert (keys.diff() > 0).all(), "row not sorted or duplicate entry"
        edges.append(local[p.indices] * n + p.inner_global_ids[rows])
        # Halo grouped by owner in rank order; degrees global; node data sliced right.
        assert torch.equal(
            owner[p.halo_global_ids], torch.repeat_interleave(torch.arange(k), p.halo_counts)
        )
        assert int(p.halo_counts[p.rank]) == 0
        assert torch.equal(p.in_degree, in_degree[local])
        assert torch.equal(p.x, data.x[p.inner_global_ids])
        assert torch.equal(p.y, data.y[p.inner_global_ids])
        for mask in ("train_mask", "val_mask", "test_mask"):
            assert torch.equal(getattr(p, mask), getattr(data, mask)[p.inner_global_ids])
    edges = torch.sort(torch.cat(edges)).values
    expected = torch.sort(data.edge_index[0] * n + data.edge_index[1]).values
    assert torch.equal(edges, expected), "the parts do not reconstruct the edge set"

    for i, receiver in enumerate(parts):
        offsets = torch.cumsum(receiver.halo_counts, 0) - receiver.halo_counts
        for j, sender in enumerate(parts):
            group = receiver.halo_global_ids[offsets[j] : offsets[j] + receiver.halo_counts[j]]
            assert torch.equal(sender.inner_global_ids[sender.send_ids[i]], group)
        assert receiver.send_ids[i].numel() == 0


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("name", ["cora", "coauthor-cs", "synthetic"])
def test_parts_reconstruct_graph(name: str, k: int, tmp_path: Path) -> None:
    if name == "synthetic":
        data = load_dataset("synthetic", num_nodes=4000, num_features=8)
    else:
        data = real_dataset(name)
    manifest = partition(data, k, tmp_path / "p", verbose=False)
    check_partition(data, tmp_path / "p", k)
    assert manifest["num_nodes"] == data.num_nodes
    assert manifest["num_edges"] * 2 == data.edge_index.size(1)
    assert sum(p["inner"] for p in manifest["parts"]) == data.num_nodes
    assert manifest["halo_total"] == sum(p["halo"] for p in manifest["parts"])
    assert (k == 1) == (manifest["edge_cut"] == 0)


def test_random_partition_is_balanced_and_reconstructs(tmp_path: Path) -> None:
    data = small_graph()
    manifest = partition(data, 4, tmp_path / "p", method="random", seed=3, verbose=False)
    check_partition(data, tmp_path / "p", 4)
    assert {p["inner"] for p in manifest["parts"]} == {150}


@pytest.mark.parametrize("name", REAL)
def test_metis_cuts_fewer_edges_than_random(name: str, tmp_path: Path) -> None:
    data = real_dataset(name)
    metis = partition(data, 4, tmp_path / "m", method="metis", verbose=False)
    random = partition(data, 4, tmp_path / "r", method="random", verbose=False)
    assert metis["edge_cut"] < random["edge_cut"]
    assert metis["halo_total"] < random["halo_total"]


def test_local_csr_extension_matches_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _ext.available():
        pytest.skip(f"C++ extension not in use ({_ext.describe()})")
    data = small_graph(n=2000, edges=20000, seed=5)
    g_indptr, g_indices = global_in_csr(data.edge_index, data.num_nodes)
    gen = torch.Generator().manual_seed(1)
    for rows_n in (0, 1, 700):
        rows = torch.randperm(data.num_nodes, generator=gen)[:rows_n]
        local_of = torch.randperm(data.num_nodes, generator=gen)  # every node has a local id
        ext = local_csr(g_indptr, g_indices, rows, local_of)
        monkeypatch.setattr(_ext, "available", lambda: False)
        fallback = local_csr(g_indptr, g_indices, rows, local_of)
        monkeypatch.undo()
        assert torch.equal(ext[0], fallback[0]) and torch.equal(ext[1], fallback[1])


def test_local_csr_rejects_unmapped_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    data = small_graph()
    g_indptr, g_indices = global_in_csr(data.edge_index, data.num_nodes)
    local_of = torch.full((data.num_nodes,), -1, dtype=torch.long)
    rows = torch.tensor([int(data.edge_index[1, 0])])
    local_of[rows] = 0
    for available in (True, False):
        if available and not _ext.available():
            continue
        monkeypatch.setattr(_ext, "available", lambda a=available: a)
        with pytest.raises(RuntimeError, match="no local id"):
            local_csr(g_indptr, g_indices, rows, local_of)


def test_tampered_missing_and_corrupt_files(tmp_path: Path) -> None:
    data = small_graph()
    out = tmp_path / "p"
    partition(data, 2, out, verbose=False)
    verify_partition(out)
    target = out / part_file(1)
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    load_partition(out, 0)  # the untouched part still loads
    with pytest.raises(PartitionError, match="SHA-256"):
        load_partition(out, 1)
    with pytest.raises(PartitionError, match="SHA-256"):
        verify_partition(out)
    target.unlink()
    with pytest.raises(PartitionError, match="missing"):
        load_partition(out, 1)
    with pytest.raises(PartitionError, match="outside"):
        load_partition(out, 2)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(PartitionError, match="corrupt"):
        read_manifest(out)
    with pytest.raises(PartitionError, match=r"manifest\.json is missing"):
        load_partition(tmp_path / "nowhere", 0)


def test_bad_arguments(tmp_path: Path) -> None:
    data = small_graph()
    for k in (0, -1, data.num_nodes + 1):
        with pytest.raises(PartitionError, match="--parts"):
            partition(data, k, tmp_path / "p", verbose=False)
    with pytest.raises(PartitionError, match="unknown partition method"):
        partition(data, 2, tmp_path / "p", method="spectral", verbose=False)
    with pytest.raises(PartitionError, match="balance"):
        partition(data, 2, tmp_path / "p", balance="nodes,colour", verbose=False)
    assert not (tmp_path / "p").exists()


def test_output_directory_rules(tmp_path: Path) -> None:
    data = small_graph()
    out = tmp_path / "p"
    first = partition(data, 2, out, verbose=False)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert partition(data, 2, out, verbose=False) == first  # identical: reused, not rewritten
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(PartitionError, match="another partition"):
        partition(data, 4, out, verbose=False)
    assert read_manifest(out)["num_parts"] == 2  # nothing lost
    partition(data, 4, out, overwrite=True, verbose=False)
    assert read_manifest(out)["num_parts"] == 4
    check_partition(data, out, 4)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PartitionError, match="not empty"):
        partition(data, 2, foreign, overwrite=True, verbose=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_failure_leaves_nothing_half_written(tmp_path: Path, monkeypatch) -> None:
    import bns_pipe.partition as partition_module

    def failing_parts(*args, **kwargs):
        yield from []
        raise OSError("disk full")

    monkeypatch.setattr(partition_module, "build_parts", failing_parts)
    with pytest.raises(OSError, match="disk full"):
        partition(small_graph(), 2, tmp_path / "p", verbose=False)
    assert list(tmp_path.iterdir()) == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bns_pipe", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_partition_and_info(tmp_path: Path) -> None:
    out = tmp_path / "p"
    common = ["--dataset", "synthetic", "--num-nodes", "3000", "--num-features", "8"]
    done = run_cli("partition", *common, "--parts", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "edge cut" in done.stdout and "all" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "synthetic"
    assert manifest["dataset"]["options"]["num_nodes"] == 3000
    info = run_cli("info", str(out))
    assert info.returncode == 0 and "match their SHA-256" in info.stdout
    (out / part_file(0)).write_bytes(b"tampered")
    bad = run_cli("info", str(out))
    assert bad.returncode == 2 and "SHA-256" in bad.stderr and "Traceback" not in bad.stderr
    again = run_cli("partition", *common, "--parts", "4", "--out", str(out))
    assert again.returncode == 2 and "another partition" in again.stderr


def test_partition_objective_volume_shrinks_the_halo(tmp_path: Path) -> None:
    """``--partition-obj vol`` (METIS k-way, communication volume) gives a smaller halo total
    than the edge cut; ``cut`` is METIS's default partition, bit for bit."""
    import pymetis

    data = load_dataset("synthetic", num_nodes=5000, num_features=4, num_classes=4)
    cut = partition(data, 4, tmp_path / "cut", verbose=False)
    vol = partition(data, 4, tmp_path / "vol", objective="vol", verbose=False)
    assert cut["objective"] == "cut" and vol["objective"] == "vol"
    assert vol["halo_total"] < cut["halo_total"]
    indptr, indices = global_in_csr(data.edge_index, data.num_nodes)
    dtype = pymetis.zero_copy_dtype()
    weights = torch.stack(
        [torch.ones(data.num_nodes, dtype=torch.long), data.train_mask.long(), indptr.diff()], 1
    )
    _, default = pymetis.part_graph(
        4,
        adjacency=pymetis.CSRAdjacency(indptr.numpy().astype(dtype), indices.numpy().astype(dtype)),
        vweights=weights.numpy().astype(dtype).reshape(-1),
        options=pymetis.Options(seed=0),
    )
    owners = torch.empty(data.num_nodes, dtype=torch.long)
    for k in range(4):
        owners[load_partition(tmp_path / "cut", k).inner_global_ids] = k
    assert owners.tolist() == list(default)
    with pytest.raises(PartitionError, match="holds another partition"):
        partition(data, 4, tmp_path / "cut", objective="vol", verbose=False)
    with pytest.raises(PartitionError, match="applies to METIS, not random"):
        partition(data, 4, tmp_path / "r", method="random", objective="vol", verbose=False)
    done = subprocess.run(
        [sys.executable, "-m", "bns_pipe", "info", str(tmp_path / "vol")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "objective vol" in done.stdout, done.stderr
