"""BNS ops on the CPU: the C++ extension against the pure-PyTorch fallback.

For random halo blocks ``A_halo`` (n_inner, n_halo) with ``nnz`` entries (8 per row, 16 per
halo column on average, columns sorted within a row), times per epoch's operations at keep
probability p, with 1 and 2 threads:

* ``sample``: ``BoundarySampler.sample`` for K = 4 peers (send lists and halo groups each
  n_halo / 3 long; the hashing runs through ``random.keep_mask``);
* ``filter_halo_block``: the kept columns of ``A_halo`` and the kept rows of its transpose;
* ``pack_rows`` / ``scatter_add_rows``: m = p·n_halo random rows (repeats allowed) of F = 128
  float32 features, scale 1/p.

Each case reports the minimum and median of ``reps`` calls, interleaved between the two
paths, and the speed-up (fallback time / extension time, from the minima); results are
checked equal first. Run ``python benchmarks/bns_ops.py`` after ``make install`` (a few
minutes on 2 cores); it writes ``benchmarks/results/bns_ops.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from machine import describe, finish, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bns_pipe import _ext
from bns_pipe.sampling import (
    BoundarySampler,
    filter_halo_block,
    pack_rows,
    scatter_add_rows,
)
from bns_pipe.sparse import CSR

RESULTS = Path(__file__).resolve().parent / "results" / "bns_ops.json"
ROWS_PER_INNER, ROWS_PER_HALO = 8, 16
PEERS = 4


@contextmanager
def fallback() -> Iterator[None]:
    """Run the ops on their pure-PyTorch path inside the block."""
    available = _ext.available
    _ext.available = lambda: False
    try:
        yield
    finally:
        _ext.available = available


def halo_block(nnz: int, seed: int = 0) -> CSR:
    """A random ``(nnz / 8, nnz / 16)`` CSR, 8 sorted columns per row, values in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    n_inner, n_halo = nnz // ROWS_PER_INNER, nnz // ROWS_PER_HALO
    cols = torch.randint(0, n_halo, (n_inner, ROWS_PER_INNER), generator=gen)
    indptr = torch.arange(0, n_inner * ROWS_PER_INNER + 1, ROWS_PER_INNER)
    return CSR(indptr, cols.sort(dim=1).values.flatten(), torch.rand(nnz, generator=gen), n_halo)


def sampler(n_halo: int, n_inner: int, p: float) -> BoundarySampler:
    """Rank 0 of K peers, each sending and receiving n_halo / (K - 1) boundary nodes."""
    per_peer = n_halo // (PEERS - 1)
    gen = torch.Generator().manual_seed(1)
    send = [torch.empty(0, dtype=torch.int64)]
    send += [torch.randint(0, n_inner, (per_peer,), generator=gen) for _ in range(PEERS - 1)]
    return BoundarySampler(0, 0, PEERS, send, [0] + [per_peer] * (PEERS - 1), p)


def cases(A: CSR, p: float, F: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """Per op of one halo block: the timed callable, and one whose result is compared across
    the paths (the same, except that the compared scatter starts from zeros)."""
    gen = torch.Generator().manual_seed(2)
    n_inner, n_halo = A.shape
    A_t = A.transpose()
    keep = torch.rand(n_halo, generator=gen) < p
    m = round(p * n_halo)
    x = torch.randn(n_inner, F, generator=gen)
    index = torch.randint(0, n_inner, (m,), generator=gen)
    rows = torch.randn(m, F, generator=gen)
    out = torch.zeros(n_inner, F)
    bns = sampler(n_halo, n_inner, p)

    def filtered() -> list[torch.Tensor]:
        block, block_t = filter_halo_block(A, A_t, keep, 1 / p)
        return [block.indptr, block.indices, block.values, block_t.indptr, block_t.values]

    def sampled() -> list[torch.Tensor]:
        s = bns.sample(3)
        return [s.send_index, s.halo_keep]

    def pack() -> torch.Tensor:
        return pack_rows(x, index, 1 / p)

    return {
        "sample": (sampled, sampled),
        "filter_halo_block": (filtered, filtered),
        "pack_rows": (pack, pack),
        "scatter_add_rows": (
            lambda: scatter_add_rows(out, index, rows, 1 / p),
            lambda: scatter_add_rows(torch.zeros_like(out), index, rows, 1 / p),
        ),
    }


def time_both(fn: Callable[[], object], reps: int) -> dict[str, list[float]]:
    """Seconds of ``reps`` calls on each path, interleaved, after one warm-up call each."""
    fn()
    with fallback():
        fn()
    times: dict[str, list[float]] = {"ext": [], "fallback": []}
    for _ in range(reps):
        for path in times:
            start = time.perf_counter()
            if path == "ext":
                fn()
            else:
                with fallback():
                    fn()
            times[path].append(time.perf_counter() - start)
    return times


def new_output_s(m: int, F: int, reps: int) -> float:
    """Seconds to allocate and first write an (m, F) float32 tensor, which pack_rows returns."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.empty(m, F).zero_()
        times.append(time.perf_counter() - start)
    return min(times)


def check_equal(name: str, fn: Callable[[], object]) -> None:
    """The two paths give bit-identical results."""
    ours = fn()
    ours = [t.clone() for t in ours] if isinstance(ours, list) else ours.clone()
    with fallback():
        theirs = fn()
    pairs = zip(ours, theirs, strict=True) if isinstance(ours, list) else [(ours, theirs)]
    if not all(torch.equal(a, b) for a, b in pairs):
        raise AssertionError(f"{name}: extension and fallback differ")


def run(nnz_list: list[int], threads_list: list[int], p: float, F: int, reps: int) -> list[dict]:
    rows = []
    for nnz in nnz_list:
        A = halo_block(nnz)
        fns = cases(A, p, F)
        for name, (_, checked) in fns.items():
            check_equal(name, checked)
        for threads in threads_list:
            torch.set_num_threads(threads)
            for name, (fn, _) in fns.items():
                t = time_both(fn, reps)
                row = {
                    "op": name,
                    "nnz": nnz,
                    "n_inner": A.n_rows,
                    "n_halo": A.n_cols,
                    "rows_m": round(p * A.n_cols) if "rows" in name else None,
                    "F": F if "rows" in name else None,
                    "p": p,
                    "threads": threads,
                    "reps": reps,
                    **{f"{k}_min_ms": 1e3 * min(v) for k, v in t.items()},
                    **{f"{k}_median_ms": 1e3 * statistics.median(v) for k, v in t.items()},
                    "speedup": min(t["fallback"]) / min(t["ext"]),
                }
                if name == "pack_rows":
                    row["new_output_ms"] = 1e3 * new_output_s(row["rows_m"], F, reps)
                rows.append(row)
                print(
                    f"nnz={nnz:,} threads={threads} {name}: ext {row['ext_min_ms']:.2f} ms, "
                    f"fallback {row['fallback_min_ms']:.2f} ms, x{row['speedup']:.2f}",
                    flush=True,
                )
    return rows


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# BNS ops benchmark",
        "",
        f"`python benchmarks/bns_ops.py` on {summary(report['machine'])}",
        "",
        f"Random halo blocks with {ROWS_PER_INNER} entries per inner row and "
        f"{ROWS_PER_HALO} per halo column on average; keep probability p = {s['p']}; "
        f"pack/scatter move m = p·n_halo rows of F = {s['F']} float32 features (scale 1/p); "
        f"`sample` is `BoundarySampler.sample` with K = {PEERS} peers (its hashing is "
        "`random.keep_mask`'s C++ op or fallback). Times are the minimum "
        f"(median in brackets) of {s['reps']} calls in ms; *speed-up* is fallback / extension "
        "(minima). Both paths give bit-identical results (checked).",
        "",
        "| op | nnz | n_inner | n_halo | threads | extension ms | fallback ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['op']} | {r['nnz']:,} | {r['n_inner']:,} | {r['n_halo']:,} | {r['threads']} "
            f"| {r['ext_min_ms']:.2f} ({r['ext_median_ms']:.2f}) "
            f"| {r['fallback_min_ms']:.2f} ({r['fallback_median_ms']:.2f}) "
            f"| {r['speedup']:.2f}× |"
        )
    lines += ["", "## Reading", "", *reading(report)]
    return "\n".join(lines) + "\n"


def reading(report: dict) -> list[str]:
    """Bullet points computed from the results."""
    out = []
    for op in ("sample", "filter_halo_block", "pack_rows", "scatter_add_rows"):
        rows = [r for r in report["results"] if r["op"] == op]
        ups = [r["speedup"] for r in rows]
        out.append(
            f"- `{op}`: the extension is {min(ups):.2f}–{max(ups):.2f}× the fallback's speed."
        )
    for r in report["results"]:
        if r["op"] == "pack_rows" and r["nnz"] == max(x["nnz"] for x in report["results"]):
            out.append(
                f"- `pack_rows` returns a new (m, F) buffer: at nnz = {r['nnz']:,}, "
                f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}, allocating and first "
                "writing it alone takes "
                f"{r['new_output_ms']:.1f} ms of the extension's {r['ext_min_ms']:.1f} ms "
                "(page faults; the fallback pays the same), which bounds the ratio."
            )
    m = report["machine"]
    out.append(
        f"- Shared machine: 1-minute load average {m['load_average_at_start'][0]} at start and "
        f"{m['load_average_at_end'][0]} at the end on {m['cpu_cores']} cores; 2-thread times "
        "are the most affected."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnz", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--p", type=float, default=0.3)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not _ext.available():
        raise SystemExit(f"the C++ extension is needed: {_ext.describe()}")

    report = {
        "machine": describe(),
        "settings": {"p": args.p, "F": args.features, "reps": args.reps, "peers": PEERS},
    }
    report["results"] = run(args.nnz, args.threads, args.p, args.features, args.reps)
    report["machine"] = finish(report["machine"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
