"""Where one epoch's time goes, op by op, against the machine floor's own parts.

    python benchmarks/floor.py [--num-nodes 100000] [--epochs 3] [--threads 2]
    python benchmarks/floor.py --dataset coauthor-cs   # a stored graph: floor-<dataset>.*

One process, the ``benchmarks/train.py`` model (3 layers, hidden 128, dropout 0.5) on its
synthetic graph or a stored one. ``torch.profiler`` records ``--epochs`` training steps
after a warm-up; each op's *self* time (its own work, not its children's) goes to one of the
floor's parts (GEMM, sparse products, elementwise passes) or to what the floor does not
contain (allocation, copies and layout, the rest), and each part is set against the
floor's estimate of it (``benchmarks/machine_floor.py``'s ``floor_epoch_s``). What profiled
ops leave of the step's wall time is Python, autograd bookkeeping and waiting: "outside ops".
Writes ``floor.json`` and ``floor.md`` (``floor-<dataset>.*`` for a stored graph).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe, finish  # noqa: E402
from benchmarks.machine import summary as machine_summary  # noqa: E402
from benchmarks.machine_floor import (  # noqa: E402
    DROPOUT,
    HIDDEN,
    LAYERS,
    floor_epoch_s,
    graph_shape,
)
from benchmarks.train import load_graph, one_process_trainer  # noqa: E402
from bns_pipe.graph import LocalGraph  # noqa: E402
from bns_pipe.memory import keep_freed_memory  # noqa: E402
from bns_pipe.partition import load_partition, partition  # noqa: E402

# op name → the floor part it belongs to; anything unlisted is "other"
PARTS = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "sparse": ("bns_pipe::spmm",),
    "elementwise": (
        "aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::div", "aten::div_",
        "aten::relu", "aten::clamp_min", "aten::threshold_backward", "aten::where", "aten::sum",
        "aten::neg",
        "aten::sub", "aten::addcmul_", "aten::addcdiv_", "aten::sqrt", "aten::lerp_",
        "aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
        "aten::nll_loss_backward", "aten::native_layer_norm", "aten::native_layer_norm_backward",
        "aten::_foreach_add_", "aten::_foreach_mul_", "aten::_foreach_addcmul_",
        "aten::_foreach_addcdiv_", "aten::_foreach_sqrt", "aten::_foreach_div_",
        "aten::_foreach_lerp_", "aten::_foreach_add", "aten::_foreach_sqrt_",
        "bns_pipe::keyed_dropout_rows", "bns_pipe::keyed_dropout_csr",
        "bns_pipe::random_keep_mask",
        "bns_pipe::layer_epilogue", "bns_pipe::layer_epilogue_backward",
    ),
    "allocation": (
        "aten::empty", "aten::empty_strided", "aten::zeros", "aten::zero_", "aten::fill_",
        "aten::resize_", "aten::empty_like", "aten::zeros_like", "aten::new_empty",
        "aten::new_zeros", "aten::ones_like",
    ),
    "copies and layout": (
        "aten::copy_", "aten::clone", "aten::contiguous", "aten::t", "aten::transpose",
        "aten::index", "aten::index_select", "aten::index_put_", "aten::cat", "aten::stack",
        "aten::to", "aten::_to_copy", "aten::view", "aten::reshape", "aten::as_strided",
        "aten::select", "aten::slice", "aten::expand", "aten::detach", "aten::masked_select",
    ),
}  # fmt: skip
PART_OF = {op: part for part, ops in PARTS.items() for op in ops}


def profile_model(part_dir: str, model: str, epochs: int, warmup: int = 3) -> dict:
    """Self time per op over ``epochs`` profiled steps, and the steps' wall time."""
    with one_process_trainer(part_dir, model) as trainer:
        for epoch in range(warmup):
            trainer.train_step(epoch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for epoch in range(warmup, warmup + epochs):
                trainer.train_step(epoch)
            wall = time.perf_counter() - start
    ops = defaultdict(lambda: {"self_s": 0.0, "calls": 0})
    for event in prof.key_averages():
        ops[event.key]["self_s"] += event.self_cpu_time_total / 1e6 / epochs
        ops[event.key]["calls"] += event.count // epochs
    return {"wall_s": wall / epochs, "ops": dict(ops)}


def breakdown(profiled: dict, floor: dict) -> dict:
    parts = defaultdict(float)
    for name, op in profiled["ops"].items():
        parts[PART_OF.get(name, "other")] += op["self_s"]
    in_ops = sum(parts.values())
    return {
        "wall_s": profiled["wall_s"],
        "parts_s": {**dict(parts), "outside ops": profiled["wall_s"] - in_ops},
        "floor_parts_s": {k: floor[f"{k}_s"] for k in ("gemm", "sparse", "elementwise")},
        "floor_s": floor["floor_s"],
        "all_ops": sorted(
            ({"op": k, **v} for k, v in profiled["ops"].items()),
            key=lambda r: -r["self_s"],
        ),
    }


def markdown(result: dict) -> str:
    g = result["graph"]
    lines = [
        "# One epoch against the machine floor, op by op",
        "",
        f"`python benchmarks/floor.py`: {g.get('dataset', 'synthetic')} {g['num_nodes']:,} "
        f"nodes, average degree {g['avg_degree']:g}, {g['num_features']} features; {LAYERS} "
        f"layers, hidden {HIDDEN}, dropout {DROPOUT}; one process, {result['threads']} threads; "
        f"self time per op from `torch.profiler`, averaged over {result['epochs']} steps after "
        f"3 warm-up steps. {machine_summary(result['machine'])}",
        "",
    ]
    for model, r in result["models"].items():
        floor = r["floor_parts_s"]
        lines += [
            f"## {model.upper()}: {r['wall_s']:.3f} s per step, floor {r['floor_s']:.3f} s "
            f"({r['wall_s'] / r['floor_s']:.2f}x)",
            "",
            "| part | ours s | floor s | ours / floor |",
            "|---|---:|---:|---:|",
        ]
        order = [*floor, "allocation", "copies and layout", "other", "outside ops"]
        for part in order:
            ours = r["parts_s"].get(part, 0.0)
            ref = floor.get(part)
            cells = (f"{ref:.3f}", f"{ours / ref:.2f}") if ref else ("–", "– (not in the floor)")
            lines.append(f"| {part} | {ours:.3f} | {cells[0]} | {cells[1]} |")
        elementwise = [o for o in r["all_ops"] if PART_OF.get(o["op"]) == "elementwise"]
        top = max(elementwise, key=lambda o: o["self_s"])
        gap = r["wall_s"] - r["floor_s"]
        over = r["parts_s"].get("elementwise", 0.0) - floor["elementwise"]
        lines += [
            "",
            f"Of the {gap:.3f} s above the floor, elementwise passes take {over:.3f} s more "
            f"than their estimate; the largest is `{top['op']}` ({top['self_s']:.3f} s in "
            f"{top['calls']} calls, {100 * top['self_s'] / r['wall_s']:.0f}% of the step).",
        ]
        lines += ["", "| op (largest self time) | self s | calls per step |", "|---|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['self_s']:.4f} | {o['calls']} |" for o in r["all_ops"][:15]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic", help="synthetic or a stored graph")
    parser.add_argument("--num-nodes", type=int, default=100_000)
    parser.add_argument("--avg-degree", type=float, default=16.0)
    parser.add_argument("--num-features", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.set_defaults(quick=False)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the trainer does, before the floor is measured
    machine = describe()
    graph, data = load_graph(args)
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        part_dir = str(Path(tmp) / "p1")
        partition(data, 1, part_dir, verbose=False)
        shape = graph_shape(data, LocalGraph(load_partition(part_dir, 0)).blocks["gcn"][0])
        for model in ("gcn", "sage"):
            floor = floor_epoch_s(shape, model)
            models[model] = breakdown(profile_model(part_dir, model, args.epochs), floor)
            print(json.dumps({model: models[model]["parts_s"]}), flush=True)
    result = {
        "machine": finish(machine),
        "graph": graph,
        "threads": args.threads,
        "epochs": args.epochs,
        "models": models,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "floor" if args.dataset == "synthetic" else f"floor-{args.dataset}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(f"results: {args.out / f'{stem}.md'}")


if __name__ == "__main__":
    main()
