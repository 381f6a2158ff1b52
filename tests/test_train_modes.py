"""``--use-pp`` and ``--inductive`` against their definitions (single-process PyG runs)."""

from __future__ import annotations

import pytest

from tests.test_gold import check_against_reference, gold_dataset, run_world

# (world size, options) — all cases of one world size run in one spawn of ranks.
CASES = [
    (2, {"model": "gcn", "use_pp": True}),
    (2, {"model": "sage", "use_pp": True}),
    (1, {"model": "gcn", "inductive": True}),
    (1, {"model": "sage", "inductive": True, "use_pp": True}),
    (3, {"model": "gcn", "inductive": True}),
    (3, {"model": "sage", "inductive": True, "use_pp": True}),
]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda w: f"world{w}")
def mode_world(request, tmp_path_factory) -> tuple[int, dict]:
    world = request.param
    cases = [("synthetic", options) for w, options in CASES if w == world]
    return world, run_world(world, cases, tmp_path_factory.mktemp(f"modes{world}"))


@pytest.mark.parametrize("index", range(len(CASES)))
def test_mode_matches_its_definition(mode_world, index: int) -> None:
    world, runs = mode_world
    case_world, options = CASES[index]
    if case_world != world:
        pytest.skip("runs under another world size")
    position = [i for i, (w, _) in enumerate(CASES) if w == world].index(index)
    data = gold_dataset("synthetic")
    results = runs[f"synthetic/{position}"]
    check_against_reference(data, results, **options)
    if options.get("inductive"):
        assert sum(r["ids"].numel() for r in results) == int(data.train_mask.sum())
        assert sum(r["eval_ids"].numel() for r in results) == data.num_nodes
