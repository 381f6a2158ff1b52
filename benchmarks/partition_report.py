"""The Markdown report of ``benchmarks/partition.py``: its tables and a reading computed
from the results (so it stays true when the benchmark is rerun)."""

from __future__ import annotations

import itertools
import math

from machine import summary

GIB = 2**30


def markdown(report: dict) -> str:
    """The results as Markdown tables plus a short reading."""
    lines = [
        "# Partition benchmark",
        "",
        f"`python benchmarks/partition.py` on {summary(report['machine'])}",
        "",
        f"Synthetic graphs: `load_dataset('synthetic', num_nodes=N, "
        f"**{report['settings']['synthetic_options']})` (DC-SBM,",
        "homophily 0.5, power-law degrees); METIS balances nodes, training nodes and edges.",
        "Each row is one fresh process. Times in seconds: *generate* makes the graph, *CSR*",
        "builds the in-edge CSR, *assign* runs METIS (or a random permutation), *build+write*",
        "cuts, saves and hashes the part files. Memory in GiB: *peak* is `ru_maxrss` of the",
        "whole run, *growth* the partition's peak RSS above the RSS once the graph is loaded.",
        "*edges* are undirected; *repl.* is (N + halo) / N; *imb.* is max / mean per part of",
        "inner nodes and of (in-)edges. *load avg*: the machine's 1-minute load average at the",
        "start and end of the run (2 cores, shared: compare times only at similar load).",
        "",
        "| nodes | edges | K | method | load avg | generate | CSR | assign | build+write "
        "| partition | total | RSS loaded | peak | growth | edge cut | cut % | halo | repl. "
        "| imb. nodes / train / edges |",
        "|---:|---:|---:|---|---:|" + "---:|" * 14,
    ]
    synthetic = [e for e in report["runs"] if e["spec"]["kind"] == "synthetic"]
    for entry in synthetic:
        spec = entry["spec"]
        head = f"| {spec['num_nodes']:,} |"
        if entry["status"] != "ok":
            lines.append(
                f"{head} — | {spec['num_parts']} | {spec['method']} | {_load(entry)} | **failed**: "
                f"{entry['reason']} (in phase {entry['phase_at_failure']}, after "
                f"{entry['wall_s']}s; child RSS reached {entry['watched_max_rss_gib']} GiB) |"
                + " — |"
                * 13
            )
            continue
        r = entry["runs"][0]
        t, m = r["times_s"], r["memory_gib"]
        lines.append(
            f"{head} {r['num_edges']:,} | {r['num_parts']} | {r['method']} | {_load(entry)} | "
            f"{t['load']:.1f} | "
            f"{t['csr']:.1f} | {t['assign']:.1f} | {t['build_write']:.1f} | "
            f"{t['partition']:.1f} | "
            f"{t['total']:.1f} | {m['rss_after_load']:.2f} | {m['peak_rss']:.2f} | "
            f"{m['partition_growth']:.2f} | {r['edge_cut']:,} | {r['edge_cut_pct']} | "
            f"{r['halo_total']:,} | {r['replication']} | {_imbalance(r)} |"
        )
    real = [r for e in report["runs"] if e["spec"]["kind"] == "real" for r in e.get("runs", [])]
    failed_real = [e for e in report["runs"] if e["spec"]["kind"] == "real" and e["status"] != "ok"]
    if real or failed_real:
        lines += [
            "",
            "Shared real datasets (one process per dataset; times in seconds, partition only):",
            "",
            "| dataset | nodes | edges | K | METIS cut | random cut | METIS / random "
            "| METIS halo | random halo | METIS repl. | METIS imb. nodes / train / edges "
            "| METIS s | random s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        by_key = {(r["graph"], r["num_parts"], r["method"]): r for r in real}
        for graph, k, method in by_key:
            if method != "metis" or (graph, k, "random") not in by_key:
                continue
            me, ra = by_key[graph, k, "metis"], by_key[graph, k, "random"]
            lines.append(
                f"| {graph} | {me['num_nodes']:,} | {me['num_edges']:,} | {k} | "
                f"{me['edge_cut']:,} ({me['edge_cut_pct']}%) | "
                f"{ra['edge_cut']:,} ({ra['edge_cut_pct']}%) | "
                f"{me['edge_cut'] / max(ra['edge_cut'], 1):.3f} | {me['halo_total']:,} | "
                f"{ra['halo_total']:,} | {me['replication']} | {_imbalance(me)} | "
                f"{me['times_s']['partition']:.2f} | {ra['times_s']['partition']:.2f} |"
            )
        for entry in failed_real:
            lines.append(f"| {entry['spec']['dataset']} | **failed**: {entry['reason']} |")
    lines += ["", "## Reading", "", *reading(report)]
    return "\n".join(lines) + "\n"


def reading(report: dict) -> list[str]:
    """Bullet points computed from the results (so they stay true when it is rerun)."""
    ok = [
        {**e["runs"][0], "load_avg": _load(e)}
        for e in report["runs"]
        if e["spec"]["kind"] == "synthetic" and e.get("runs")
    ]
    real = [r for e in report["runs"] if e["spec"]["kind"] == "real" for r in e.get("runs", [])]
    failed = [e for e in report["runs"] if e["status"] != "ok"]
    out = []
    metis = {(r["num_nodes"], r["num_parts"]): r for r in ok if r["method"] == "metis"}
    sizes = sorted({n for n, _ in metis})
    for k in sorted({k for _, k in metis}):
        steps = []
        for a, b in itertools.pairwise(sizes):
            if (a, k) in metis and (b, k) in metis:
                ta, tb = (metis[n, k]["times_s"]["assign"] for n in (a, b))
                exponent = math.log(tb / ta) / math.log(b / a)
                steps.append(
                    f"{ta:.1f}s at {a:,} → {tb:.1f}s at {b:,} nodes (×{tb / ta:.1f} for "
                    f"×{b / a:.1f} nodes, ≈ N^{exponent:.2f}; load avg "
                    f"{metis[a, k]['load_avg']} and {metis[b, k]['load_avg']})"
                )
        if steps:
            out.append(f"- METIS time (assign column), K={k}: " + "; ".join(steps) + ".")
    if metis:
        n, k = max(metis)
        r = metis[n, k]
        t, m = r["times_s"], r["memory_gib"]
        sampled = ""
        if r["memory_exact"]["assign"] and m["sampled_max_assign"] < m["peak_rss_assign"]:
            sampled = (
                f" (the 50 ms sampler thread saw at most {m['sampled_max_assign']:.2f} GiB "
                "then: pymetis holds the GIL, so that peak is read from VmHWM)"
            )
        out.append(
            f"- Largest METIS run ({n:,} nodes, K={k}): of {t['total']:.0f}s in all, "
            f"{t['load']:.0f}s generate the graph, {t['csr']:.0f}s build the CSR, "
            f"{t['assign']:.0f}s run METIS ({100 * t['assign'] / t['total']:.0f}%), "
            f"{t['build_write']:.0f}s build and write the parts. Memory: "
            f"{m['rss_after_imports']:.2f} GiB after imports, {m['rss_after_load']:.2f} GiB "
            f"with the graph loaded (peak {m['peak_rss_load']:.2f} while generating); CSR + "
            f"METIS peak at {m['peak_rss_assign']:.2f} GiB{sampled}, build+write at "
            f"{m['peak_rss_build_write']:.2f} GiB. So METIS itself is where memory goes: "
            f"partitioning adds {m['partition_growth']:.2f} GiB "
            f"({m['partition_growth'] / max(m['rss_after_load'], 1e-9):.1f}× the loaded graph, "
            f"≈ {m['partition_growth'] * GIB / (2 * r['num_edges']):.0f} bytes per directed "
            f"edge) and the run peaks at {m['peak_rss']:.2f} GiB ({_peak_phase(m)})."
        )
    randoms = {(r["num_nodes"], r["num_parts"]): r for r in ok if r["method"] == "random"}
    if randoms:
        n, k = max(randoms)
        r, twin = randoms[n, k], metis.get((n, k))
        line = (
            f"- Random assignment costs nothing beyond the CSR (the permutation takes "
            f"{r['times_s']['assign']:.1f}s at {n:,} nodes, K={k}); that run adds "
            f"{r['memory_gib']['partition_growth']:.2f} GiB over the loaded graph, all in "
            f"build+write, and writes {r['partition_dir_bytes'] / GIB:.2f} GiB of part files"
        )
        if twin:
            line += (
                f" (METIS: {twin['memory_gib']['partition_growth']:.2f} GiB, "
                f"{twin['partition_dir_bytes'] / GIB:.2f} GiB; the difference on disk is "
                "the larger halo)"
            )
        out.append(line + ".")
    ratios = []
    by_run = {(r["num_nodes"], r["num_parts"], r["method"]): r for r in ok}
    for (n, k, method), r in by_run.items():
        twin = by_run.get((n, k, "random"))
        if method == "metis" and twin:
            aligned = 100 * (1 - r["edge_homophily"]) * (1 - 1 / k)
            ratios.append(
                (r["edge_cut"] / twin["edge_cut"], r["halo_total"] / twin["halo_total"], r, aligned)
            )
    if ratios:
        cuts, halos = [c for c, *_ in ratios], [h for _, h, *_ in ratios]
        detail = ", ".join(
            f"{r['num_nodes']:,}/K={r['num_parts']}: {r['edge_cut_pct']}% vs {aligned:.1f}%"
            for *_, r, aligned in ratios
        )
        out.append(
            f"- Synthetic graphs: METIS cuts {min(cuts):.2f}–{max(cuts):.2f}× the edges random "
            f"does, but its halo is still {min(halos):.2f}–{max(halos):.2f}× random's. In these "
            "DC-SBM graphs the only structure is the class (edge homophily "
            f"{ratios[0][2]['edge_homophily']:.2f}; otherwise partners are random), so the "
            "natural target is to keep classes whole, which cuts about "
            "(1 − homophily)(1 − 1/K) of the edges. METIS's cut against that estimate: "
            f"{detail}. And with ~24 neighbours per node, almost every node keeps some "
            "neighbour in another part, so the halo barely shrinks. The real graphs are far "
            "more partitionable: synthetic cut and halo are a pessimistic bound."
        )
    if real:
        by = {(r["graph"], r["num_parts"], r["method"]): r for r in real}
        pairs = [
            (by[g, k, "metis"]["edge_cut"] / max(by[g, k, "random"]["edge_cut"], 1), g, k)
            for g, k, m in by
            if m == "metis" and (g, k, "random") in by
        ]
        if pairs:
            lo, hi = min(pairs), max(pairs)
            halos = [
                by[g, k, "metis"]["halo_total"] / max(by[g, k, "random"]["halo_total"], 1)
                for _, g, k in pairs
            ]
            out.append(
                f"- Real datasets: METIS cuts {lo[0]:.2f}× ({lo[1]}, K={lo[2]}) to "
                f"{hi[0]:.2f}× ({hi[1]}, K={hi[2]}) the edges random does, and its halo is "
                f"{min(halos):.2f}–{max(halos):.2f}× random's; every partition of these small "
                f"graphs took at most {max(r['times_s']['partition'] for r in real):.1f}s "
                "(mostly building and writing the parts, for METIS and random alike)."
            )
    metis_runs = [r for r in ok + real if r["method"] == "metis"]
    if metis_runs:
        worst = []
        for key, name in (
            ("inner", "inner nodes"),
            ("train", "training nodes"),
            ("edges", "edges"),
        ):
            r = max(metis_runs, key=lambda r: r["imbalance"][key])
            where = f"{r['num_nodes']:,} nodes" if r["graph"] == "synthetic" else r["graph"]
            worst.append(f"{r['imbalance'][key]} for {name} ({where}, K={r['num_parts']})")
        synthetic_worst = max(
            (v for r in ok if r["method"] == "metis" for v in r["imbalance"].values()), default=0
        )
        random_train = max(
            (r["imbalance"]["train"] for r in real if r["method"] == "random"), default=0
        )
        out.append(
            "- Balance: METIS is asked to balance nodes, training nodes and edges, and its "
            f"worst max / mean was {', '.join(worst)}. On the synthetic graphs every "
            f"constraint stays within {synthetic_worst}; on the small real graphs the "
            "training-node and edge constraints are met only loosely (there are few training "
            f"nodes per part: random reaches {random_train} on training nodes too), so per-rank "
            "work can differ that much there. "
            "Random parts differ in size by at most one node."
        )
    m = report["machine"]
    out.append(
        f"- The whole benchmark took {report.get('wall_s', 0) / 60:.0f} minutes. "
        f"The machine was shared: 1-minute load average {m['load_average_at_start'][0]} at "
        f"start and {m.get('load_average_at_end', ['?'])[0]} at the end on "
        f"{m['cpu_cores']} cores (per-run values are in the JSON), so the times are upper "
        "bounds, inflated by up to roughly the load / cores ratio."
    )
    for e in failed:
        name = e["spec"].get("dataset") or (
            f"{e['spec']['num_nodes']:,} nodes, K={e['spec']['num_parts']}, {e['spec']['method']}"
        )
        out.append(f"- **Failed** ({name}): {e['reason']}, in phase {e['phase_at_failure']}.")
    if not failed:
        out.append("- Every run finished within the time and memory limits.")
    return out


def _imbalance(run: dict) -> str:
    return " / ".join(str(run["imbalance"][key]) for key in ("inner", "train", "edges"))


def _load(entry: dict) -> str:
    """The 1-minute load average at the start and end of one run."""
    return f"{entry['load_average_1m_at_start']}→{entry['load_average_1m_at_end']}"


def _peak_phase(memory: dict) -> str:
    phases = {
        "generating the graph": memory["peak_rss_load"],
        "assignment": memory["peak_rss_assign"],
        "build+write": memory["peak_rss_build_write"],
    }
    return "reached during " + max(phases, key=phases.get)
