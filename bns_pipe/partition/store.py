"""The partition directory: ``manifest.json`` plus one ``part_<k>.pt`` file per rank.

Part files hold only tensors and are read with ``torch.load(weights_only=True)``; the
manifest records every file's SHA-256, and loading checks it. Directories are written under
a temporary name and renamed at the end, so a failure never leaves a half-written partition.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from bns_pipe.errors import PartitionError, unreadable

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_TENSOR_KEYS = (
    "inner_global_ids",
    "halo_global_ids",
    "halo_counts",
    "indptr",
    "indices",
    "send_ids",
    "send_counts",
    "in_degree",
    "out_degree",
    "x",
    "y",
    "train_mask",
    "val_mask",
    "test_mask",
)


def part_file(rank: int) -> str:
    return f"part_{rank}.pt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Partition:
    """One rank's share of a partitioned graph (all ids int64; local ids inner-first).

    ``indptr`` (n_inner+1,) / ``indices`` (nnz,): CSR whose row r lists the in-neighbours of
    inner node r as local ids in ``[0, n_inner + n_halo)``, no self-loops. ``send_ids[j]``:
    local inner indices whose rows rank j needs, in the order of j's halo group for this rank.
    ``halo_counts[j]``: halo nodes owned by rank j. Degrees are global, without self-loops.
    """

    rank: int
    num_parts: int
    n_inner: int
    n_halo: int
    inner_global_ids: torch.Tensor
    halo_global_ids: torch.Tensor
    halo_counts: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    send_ids: list[torch.Tensor]
    in_degree: torch.Tensor
    out_degree: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    train_mask: torch.Tensor
    val_mask: torch.Tensor
    test_mask: torch.Tensor
    num_classes: int
    multilabel: bool


def write_partition(
    out: Path, parts: Iterable[dict], describe: Callable[[], dict], *, overwrite: bool = False
) -> dict:
    """Write the part files and the manifest (with file hashes) atomically into ``out``.

    ``describe()`` is called once every part is written and returns the manifest's content;
    ``format_version`` and ``files`` are added. Returns the manifest as written.
    """
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {}
        for rank, arrays in enumerate(parts):
            path = tmp / part_file(rank)
            torch.save({key: arrays[key] for key in _TENSOR_KEYS}, path)
            files[path.name] = sha256_file(path)
        manifest = {"format_version": FORMAT_VERSION, **describe(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if any(out.iterdir()):
            if not overwrite:
                raise PartitionError(f"{out} is not empty")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            new.rename(out)
            shutil.rmtree(old)
            return
        out.rmdir()
    new.rename(out)


def read_manifest(directory: str | os.PathLike) -> dict:
    """Parse ``manifest.json`` of a partition directory, with a clear error when it is bad."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise PartitionError(
            f"no partition at {directory}: {MANIFEST} is missing "
            "(create one with `bns-pipe partition --out DIR ...`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PartitionError(f"{path} is corrupt: {exc}") from exc
    required = ("format_version", "num_parts", "files", "parts", "dataset")
    if not isinstance(manifest, dict) or any(key not in manifest for key in required):
        raise PartitionError(f"{path} is corrupt: it lacks one of {required}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise PartitionError(
            f"{path} has format version {manifest['format_version']}, this bns_pipe reads "
            f"{FORMAT_VERSION}: partition the dataset again"
        )
    return manifest


def manifest_hash(directory: str | os.PathLike) -> str:
    """SHA-256 of the manifest, which pins every part file through their hashes."""
    return sha256_file(Path(directory) / MANIFEST)


def verify_file(directory: Path, name: str, manifest: dict) -> Path:
    """Check that ``name`` exists and matches its recorded hash; return its path."""
    path = directory / name
    expected = manifest["files"].get(name)
    if expected is None:
        raise PartitionError(f"{directory / MANIFEST} does not list {name}")
    if not path.is_file():
        raise PartitionError(f"partition file {path} is missing")
    if sha256_file(path) != expected:
        raise PartitionError(f"partition file {path} does not match its SHA-256 in the manifest")
    return path


def verify_partition(directory: str | os.PathLike) -> dict:
    """Check every file of a partition directory against the manifest; return the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rank in range(manifest["num_parts"]):
        verify_file(directory, part_file(rank), manifest)
    return manifest


def load_partition(directory: str | os.PathLike, rank: int) -> Partition:
    """Load rank ``rank``'s part after verifying its hash (never unpickles objects)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    k = manifest["num_parts"]
    if not 0 <= rank < k:
        raise PartitionError(f"rank {rank} is outside the {k} parts of {directory}")
    path = verify_file(directory, part_file(rank), manifest)
    try:
        arrays = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise PartitionError(f"cannot read {path}: {unreadable(exc)}") from exc
    missing = [key for key in _TENSOR_KEYS if key not in arrays]
    if missing:
        raise PartitionError(f"{path} lacks {missing}")
    send_counts = arrays.pop("send_counts")
    n_inner, n_halo = arrays["inner_global_ids"].numel(), arrays["halo_global_ids"].numel()
    if arrays["indptr"].numel() != n_inner + 1 or int(arrays["halo_counts"].sum()) != n_halo:
        raise PartitionError(f"{path} is inconsistent: CSR or halo sizes do not match")
    return Partition(
        rank=rank,
        num_parts=k,
        n_inner=n_inner,
        n_halo=n_halo,
        send_ids=list(arrays.pop("send_ids").split(send_counts.tolist())),
        num_classes=int(manifest["num_classes"]),
        multilabel=bool(manifest["multilabel"]),
        **arrays,
    )


def format_table(manifest: dict) -> str:
    """The per-part table and totals that ``bns-pipe info`` prints."""
    dataset = manifest["dataset"]
    options = ", ".join(f"{k}={v}" for k, v in sorted(dataset.get("options", {}).items()))
    n, e, cut = manifest["num_nodes"], manifest["num_edges"], manifest["edge_cut"]
    lines = [
        f"dataset {dataset['name']}" + (f" ({options})" if options else ""),
        f"{manifest['num_parts']} parts by {manifest['method']} (seed {manifest['seed']}, "
        f"balance {','.join(manifest['balance'])}, objective "
        f"{manifest.get('objective', 'cut')}); {n:,} nodes, {e:,} undirected edges",
        f"edge cut {cut:,} ({100 * cut / max(e, 1):.2f}% of edges); halo total "
        f"{manifest['halo_total']:,} (replication factor {(n + manifest['halo_total']) / n:.3f})",
        "",
        f"{'part':>4} {'inner':>12} {'halo':>12} {'halo/inner':>10} {'edges':>14} {'train':>10}",
    ]
    for k, p in enumerate(manifest["parts"]):
        ratio = p["halo"] / max(p["inner"], 1)
        lines.append(
            f"{k:>4} {p['inner']:>12,} {p['halo']:>12,} {ratio:>10.3f} "
            f"{p['edges']:>14,} {p['train']:>10,}"
        )
    total = {key: sum(p[key] for p in manifest["parts"]) for key in ("inner", "halo", "edges")}
    train = sum(p["train"] for p in manifest["parts"])
    lines.append(
        f"{'all':>4} {total['inner']:>12,} {total['halo']:>12,} "
        f"{total['halo'] / max(total['inner'], 1):>10.3f} {total['edges']:>14,} {train:>10,}"
    )
    return "\n".join(lines)
