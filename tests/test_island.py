"""Islandization (``--hook island``): the island invariants, the local renumbering, and
training that is unchanged by it (GCN and SAGE on 1, 2 and 4 ranks against PyG, with BNS and
the pipeline against the run without the hook)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bns_pipe.cli import main
from bns_pipe.errors import ConfigError
from bns_pipe.hooks.island import IslandHook
from bns_pipe.partition import Partition, load_partition, partition
from bns_pipe.train.config import TrainConfig
from tests.test_gold import check_against_reference, gold_dataset, run_world


def _edges(part: Partition) -> list[tuple[int, int]]:
    rows = torch.repeat_interleave(torch.arange(part.n_inner), part.indptr.diff())
    local = torch.cat([part.inner_global_ids, part.halo_global_ids])
    pairs = zip(part.inner_global_ids[rows].tolist(), local[part.indices].tolist(), strict=True)
    return sorted(pairs)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("island") / "p"
    partition(gold_dataset("synthetic"), 2, directory, verbose=False)
    return directory


@pytest.mark.parametrize("options", [{}, {"max_island": "5"}, {"hub_degree": "3"}])
def test_islands_cover_every_node_once_and_the_renumbering_is_local(
    parts: Path, options: dict
) -> None:
    """Every inner node is a hub or in exactly one island of at most max_island nodes, no
    island holds a hub; the order is a permutation, hub by hub with their islands; the
    renumbered part has the same edges, features, labels, masks and degrees by global id,
    send lists naming the same global nodes in the same order, halo untouched, and each
    row's columns ascending."""
    for rank in range(2):
        part = load_partition(parts, rank)
        hook = IslandHook(**options)
        new = hook.on_graph(part)
        found = hook.found
        islands, hubs = found.islands(), found.hubs.tolist()
        members = [node for island in islands for node in island]
        assert sorted(hubs + members) == list(range(part.n_inner))
        assert not set(hubs) & set(members)
        assert max(map(len, islands)) <= int(options.get("max_island", 64))
        assert torch.equal(torch.sort(found.order)[0], torch.arange(part.n_inner))
        assert not torch.equal(found.order, torch.arange(part.n_inner))  # it does move nodes
        assert _edges(new) == _edges(part)
        assert torch.equal(new.halo_global_ids, part.halo_global_ids)
        for old_ids, new_ids in zip(part.send_ids, new.send_ids, strict=True):
            assert torch.equal(new.inner_global_ids[new_ids], part.inner_global_ids[old_ids])
        position = torch.argsort(part.inner_global_ids)
        moved = torch.argsort(new.inner_global_ids)
        for key in ("x", "y", "train_mask", "val_mask", "test_mask"):
            assert torch.equal(getattr(new, key)[moved], getattr(part, key)[position])
        for key in ("in_degree", "out_degree"):
            old, now = getattr(part, key), getattr(new, key)
            assert torch.equal(now[: new.n_inner][moved], old[: part.n_inner][position])
            assert torch.equal(now[new.n_inner :], old[part.n_inner :])
        for row in range(new.n_inner):
            columns = new.indices[new.indptr[row] : new.indptr[row + 1]]
            assert torch.equal(columns, torch.sort(columns)[0])
        report = hook.report()
        assert report["islands"] == len(islands) and report["hubs"] == len(hubs)
        assert report["pruned_fraction"] == 0.0 and report["rank"] == rank


def test_islands_are_found_in_a_path_and_a_star() -> None:
    """A star: the centre is the hub, the leaves islands of one; a path of 10 with no hub
    and a cap of 4: islands 4, 4, 2 in order."""
    from bns_pipe.hooks.island import find_islands

    leaves = torch.arange(1, 9)
    indptr = torch.cat([torch.tensor([0, 8]), 8 + torch.arange(1, 9)])
    indices = torch.cat([leaves, torch.zeros(8, dtype=torch.int64)])
    found = find_islands(indptr, indices, None, 64)
    assert found.hubs.tolist() == [0] and found.islands() == [[i] for i in range(1, 9)]
    assert found.order.tolist() == list(range(9))
    src = torch.arange(9)
    row = torch.cat([src, src + 1])
    col = torch.cat([src + 1, src])
    order = torch.argsort(row * 10 + col)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(row).cumsum(0)])
    found = find_islands(indptr, col[order], 100, 4)
    assert found.hubs.tolist() == [] and found.islands() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _groups(groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of rows as (group_ptr, group_rows)."""
    sizes = torch.tensor([0] + [len(group) for group in groups])
    return sizes.cumsum(0), torch.tensor([r for group in groups for r in group], dtype=torch.int64)


@pytest.mark.parametrize(("hub_degree", "max_island"), [(None, 64), (None, 3), (2, 8), (50, 1)])
def test_island_search_in_cpp_equals_the_fallback(monkeypatch, hub_degree, max_island) -> None:
    """``csrc/islands.cpp`` finds the fallback's hubs, islands and order on a random graph
    with hubs (a few nodes joined to many), isolated nodes and several components."""
    from bns_pipe import _ext
    from bns_pipe.hooks.island import find_islands

    if not _ext.available():
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(5)
    n = 400
    src, dst = torch.randint(0, n - 20, (2, 900), generator=gen)  # the last 20 isolated
    hubs = torch.randint(0, 5, (300,), generator=gen)
    src, dst = torch.cat([src, hubs]), torch.cat([dst, torch.randint(0, n - 20, (300,))])
    dense = torch.zeros(n, n, dtype=torch.bool)
    dense[src, dst] = dense[dst, src] = True
    dense.fill_diagonal_(False)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), dense.sum(1).cumsum(0)])
    indices = dense.nonzero()[:, 1]
    native = find_islands(indptr, indices, hub_degree, max_island)
    monkeypatch.setattr(_ext, "available", lambda: False)
    fallback = find_islands(indptr, indices, hub_degree, max_island)
    for field in ("hubs", "island_ptr", "island_nodes", "order"):
        assert torch.equal(getattr(native, field), getattr(fallback, field)), field
    assert native.num_islands > 20 and (hub_degree == 50 or native.hubs.numel() > 0)


ISLANDS = "island:max_island=4,redundancy=on"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_aggregation_nodes_in_cpp_equal_the_fallback(monkeypatch, dtype) -> None:
    """``csrc/hag_build.cpp`` makes the fallback's hierarchy (also when the capacity cuts it
    short); ``csrc/hag.cpp`` (column blocks per thread, aggregates in creation order) and the
    level-by-level PyTorch fallback give the same product and transpose, bit for bit in
    float64 (the same additions), and both equal the dense matrix's."""
    from bns_pipe import _ext
    from bns_pipe.hooks.redundancy import (
        RedundancyFreeOperator,
        is_symmetric,
        merge_shared_pairs,
    )

    if not _ext.available():
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(3)
    n = 120
    dense = (torch.rand(n, n, generator=gen) < 0.15).to(torch.int64)
    dense = ((dense + dense.T + torch.eye(n, dtype=torch.int64)) > 0).to(torch.int64)
    columns = dense.nonzero()[:, 1]
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), dense.sum(1).cumsum(0)])
    groups = _groups([list(range(30)), list(range(30, n))])  # 90 rows: cut at 64
    hierarchy = merge_shared_pairs(indptr, columns, *groups, n)
    assert len(hierarchy.levels) > 1  # aggregates of aggregates
    for capacity, share in ((n, 2), (n, 3), (n, 4), (40, 2)):  # C++ = the fallback
        native = merge_shared_pairs(indptr, columns, *groups, capacity, share)
        assert native.pairs.shape[0] > 0  # (C++ leaves out neighbours under `share` rows)
        with monkeypatch.context() as patch:
            patch.setattr(_ext, "available", lambda: False)
            fallback = merge_shared_pairs(indptr, columns, *groups, capacity, share)
        assert torch.equal(native.pairs, fallback.pairs)
        assert torch.equal(native.cover.indptr, fallback.cover.indptr)
        assert torch.equal(native.cover.indices, fallback.cover.indices)
        assert len(native.levels) == len(fallback.levels)
    assert native.pairs.shape[0] == 40
    row = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    col = torch.rand(n, generator=gen, dtype=torch.float64).to(dtype)
    operator = RedundancyFreeOperator(hierarchy, row, col, self_loops=True)
    x = torch.randn(n, 37, generator=gen, dtype=torch.float64).to(dtype)
    native = operator(x), operator.transposed(x)
    monkeypatch.setattr(_ext, "available", lambda: False)
    fallback = operator(x), operator.transposed(x)
    matrix = row[:, None] * dense.to(dtype) * col[None, :]
    for got, expected, exact in zip(native, (matrix @ x, matrix.T @ x), fallback, strict=True):
        torch.testing.assert_close(got, expected)
        if dtype == torch.float64:
            torch.testing.assert_close(got, exact, rtol=1e-15, atol=1e-15)
    assert is_symmetric(indptr, columns) and not is_symmetric(*_directed(indptr, columns))
    symmetric = RedundancyFreeOperator(hierarchy, row, row, True, symmetric=True)
    matrix = row[:, None] * dense.to(dtype) * row[None, :]
    torch.testing.assert_close(symmetric.transposed(x), matrix.T @ x)


def _directed(indptr: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pattern without its first row's last entry (no longer symmetric)."""
    cut = int(indptr[1]) - 1
    return torch.cat([indptr[:1], indptr[1:] - 1]), torch.cat([columns[:cut], columns[cut + 1 :]])


def test_shared_pairs_are_summed_once_and_covers_stay_the_neighbour_sets(parts: Path) -> None:
    """A triangle with self-loops: one pair, then the pair and the third node, serve all
    three rows: 2 additions instead of 6. On a renumbered part: every cover's leaves are
    exactly the row's neighbours (integers), and the product and its transpose equal the
    block's, with GCN's self-loop term, to float64 rounding."""
    from bns_pipe.graph import LocalGraph
    from bns_pipe.hooks.island import inner_pattern
    from bns_pipe.hooks.redundancy import merge_shared_pairs, plain_additions

    indptr = torch.tensor([0, 3, 6, 9])
    triangle = merge_shared_pairs(indptr, torch.tensor([0, 1, 2] * 3), *_groups([[0, 1, 2]]), 10)
    assert triangle.pairs.tolist() == [[0, 1], [2, 3]] and triangle.additions() == 2
    assert plain_additions(indptr) == 6 and [len(lv) for lv in triangle.levels] == [1, 1]
    # a node made for one group's rows serves a row outside it (row 3 holds 2 and 3 too)
    indptr, columns = torch.tensor([0, 2, 4, 5, 8]), torch.tensor([2, 3, 2, 3, 0, 1, 2, 3])
    shared = merge_shared_pairs(indptr, columns, *_groups([[0, 1]]), 10)
    assert shared.pairs.tolist() == [[2, 3]] and shared.cover.indices[-2:].tolist() == [1, 4]
    assert shared.additions() == 2 and plain_additions(indptr) == 4
    hook = IslandHook(max_island="8", redundancy="on")
    part = hook.on_graph(load_partition(parts, 0))
    indptr, indices = inner_pattern(part, self_loops=True)
    islands = _groups(hook.found.islands())  # in old ids: renumber them
    position = torch.empty_like(hook.found.order)
    position[hook.found.order] = torch.arange(part.n_inner)
    hierarchy = merge_shared_pairs(indptr, indices, islands[0], position[islands[1]], part.n_inner)
    assert hierarchy.pairs.shape[0] > 0
    leaves = [[i] for i in range(part.n_inner)]
    for u, v in hierarchy.pairs.tolist():
        leaves.append(leaves[u] + leaves[v])
    cover = hierarchy.cover
    for row in range(part.n_inner):
        members = cover.indices[cover.indptr[row] : cover.indptr[row + 1]].tolist()
        expanded = sorted(leaf for m in members for leaf in leaves[m])
        assert expanded == indices[indptr[row] : indptr[row + 1]].tolist()
    plain, hooked = (LocalGraph(part, dtype=torch.float64, hooks=h) for h in ([], [hook]))
    x = torch.randn(part.n_inner, 3, dtype=torch.float64)
    for kind in ("gcn", "mean"):
        for graph in (plain, hooked):
            x.grad = None
            graph.aggregate(x.requires_grad_(), kind, 0).pow(2).sum().backward()
            graph.result = (graph.aggregate(x, kind, 0).detach(), x.grad.clone())
        torch.testing.assert_close(hooked.result[0], plain.result[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(hooked.result[1], plain.result[1], rtol=1e-12, atol=1e-14)
    assert hooked.inner["gcn"].self_loops and not hooked.inner["mean"].self_loops
    assert hooked.inner["gcn"].built.symmetric and not hooked.inner["mean"].built.symmetric
    report = hook.report()
    assert report["redundancy"] == "gcn on; mean on" and 0 < report["pruned_fraction"] < 1


def test_auto_keeps_the_plain_product_where_the_structure_does_not_pay(parts: Path) -> None:
    """``redundancy=auto`` times both products on the first input and says which it uses and
    why; where it keeps the plain one, nothing counts as pruned and the product is the
    block's."""
    from bns_pipe.graph import LocalGraph

    hook = IslandHook(redundancy="auto")
    part = hook.on_graph(load_partition(parts, 0))
    graph = LocalGraph(part, dtype=torch.float64, hooks=[hook])
    x = torch.randn(part.n_inner, 8, dtype=torch.float64)
    out = graph.aggregate(x, "gcn", 0)
    report = hook.report()
    state = report["redundancy"]
    assert state.startswith("gcn ") and "mean" not in state  # only the kind in use is built
    if state == "gcn on":
        assert report["pruned_fraction"] > 0.02
    else:
        assert state.startswith("gcn off: ") and report["pruned_fraction"] == 0.0
        default = graph.inner["gcn"].default  # the graph's own: self-loop term in its diagonal
        assert graph.inner["gcn"].self_loops and default.self_loops
        assert torch.equal(graph.inner["gcn"](x), default(x))
    torch.testing.assert_close(out, LocalGraph(part, dtype=torch.float64).aggregate(x, "gcn", 0))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_training_with_islands_equals_the_reference(tmp_path: Path, world: int) -> None:
    """GCN and SAGE with the hook (islands of at most 4 nodes, shared pairs summed once):
    logits, weight gradients and 5 losses of the single-process PyG model (float64)."""
    cases = [("synthetic", {"model": m, "hook": [ISLANDS]}) for m in ("gcn", "sage")]
    results = run_world(world, cases, tmp_path)
    for index, (name, options) in enumerate(cases):
        check_against_reference(gold_dataset(name), results[f"{name}/{index}"], **options)


@pytest.mark.parametrize("norm", ["unbiased", "renorm"])
def test_islands_change_nothing_with_sampling_and_the_pipeline(tmp_path: Path, norm) -> None:
    """BNS 0.3 (both normalisations: renorm scales the neighbour sum, not GCN's self-loop term
    the hook's product includes) with the pipeline on 2 ranks: with and without the hook, the
    same logits by global id, weight gradients and losses (the sample is keyed by send-list
    position, which the renumbering keeps)."""
    mode = {"model": "gcn", "sampling_rate": 0.3, "pipeline": True, "bns_norm": norm}
    cases = [("synthetic", mode), ("synthetic", {**mode, "hook": [ISLANDS]})]
    results = run_world(2, cases, tmp_path)
    for plain, hooked in zip(results["synthetic/0"], results["synthetic/1"], strict=True):
        order = torch.argsort(hooked["ids"])
        reference = torch.argsort(plain["ids"])
        torch.testing.assert_close(hooked["logits"][order], plain["logits"][reference])
        for name, grad in plain["grads"].items():
            torch.testing.assert_close(hooked["grads"][name], grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(hooked["losses"], plain["losses"], rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("island:max_island=0", "max_island must be at least 1"),
        ("island:hub_degree=0", "hub_degree must be auto or at least 1"),
        ("island:hub_degree=many", "invalid literal"),
        ("island:size=4", "unexpected keyword"),
        ("island:redundancy=maybe", "redundancy must be auto, on or off"),
        ("island:capacity=-1", "capacity must be auto or at least 0"),
        ("island:min_share=1", "min_share must be at least 2"),
    ],
)
def test_bad_island_options(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(hook=[spec]).validate()


def test_info_prints_islands_per_part(parts: Path, capfd) -> None:
    assert main(["info", str(parts), "--hook", "island:max_island=8"]) == 0
    lines = [line for line in capfd.readouterr().out.splitlines() if "island" in line]
    reports = [json.loads(line.split(": ", 1)[1]) for line in lines]
    assert [r["rank"] for r in reports] == [0, 1] and all(r["islands"] > 0 for r in reports)
