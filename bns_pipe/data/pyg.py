"""Datasets read through PyTorch Geometric and OGB dataset classes, offline.

The user's root may be read-only and is never written: each dataset is processed in a writable
cache (``paths.cache_dir``) whose ``raw/`` holds links to (or, for the pickled Planetoid files,
verified copies of) the user's raw files, and whose cache key changes when those files do.
Nothing is downloaded: missing files raise :class:`DatasetError` naming the expected path and
how to fetch it on a machine with internet access.

Layout under the root (the folders PyG / OGB themselves create):

- ``planetoid/<Cora|CiteSeer|PubMed>/raw/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``
- ``<reddit|flickr|yelp|amazon-products>/raw/<PyG's raw files>``
- ``<ogbn_arxiv|ogbn_products|ogbn_papers100M>/{RELEASE_v1.txt, raw/..., split/<kind>/...}``
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bns_pipe.data.validate import new_data
from bns_pipe.errors import DatasetError
from bns_pipe.paths import cache_dir

if TYPE_CHECKING:
    from torch_geometric.data import Data

TRUST_RAW_ENV = "BNS_PIPE_TRUST_RAW"

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
_PLANETOID_PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
# SHA-256 of kimiyoung/planetoid@af6abf468a772cc055bec88c52e4d6f51b7c37e3 data/ (the files PyG
# fetches). Cora and CiteSeer: datasets/README.md of the shared datasets; PubMed: the same values
# listed independently by two public projects that also list the Cora and CiteSeer ones above.
PLANETOID_SHA256 = {
    "ind.cora.x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
    "ind.cora.tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
    "ind.cora.allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
    "ind.cora.y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
    "ind.cora.ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
    "ind.cora.ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
    "ind.cora.graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
    "ind.cora.test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
    "ind.citeseer.x": "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
    "ind.citeseer.tx": "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
    "ind.citeseer.allx": "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
    "ind.citeseer.y": "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
    "ind.citeseer.ty": "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
    "ind.citeseer.ally": "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
    "ind.citeseer.graph": "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
    "ind.citeseer.test.index": "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
    "ind.pubmed.x": "fbe9cb5c47200d1b7769a26e579be3b7130b556831f9d850e77c4c74f2599b33",
    "ind.pubmed.tx": "4eb5f5d0f30f26497eb0ac6ac9719d09c67e284f1ed0385c93f3ef27a671da3d",
    "ind.pubmed.allx": "508e538e2abdccdd54c4d3e9f49d638b4af7107d85845f66ddea5a5152658b7e",
    "ind.pubmed.y": "e6c807633307a07ed659249006536a147c7999c797f11a2560752990181b41b3",
    "ind.pubmed.ty": "ee2e0d4819d9fbcc403689c3bf2e49face401b605932f093bc58ab6461130fdd",
    "ind.pubmed.ally": "0c37bbe3b5014ec365e9d393cf4791925e5ed94fb194305d74f064a8d7b50f0e",
    "ind.pubmed.graph": "5b89f0036ca22909471f1e6558eb42fa06e0c730a577bde5b058b40638f81dc9",
    "ind.pubmed.test.index": "b101d421688bbaecbd82e8a18f1e282378d6830f3a37666f28ebc47f844341b5",
}

_SAINT_FILES = ("adj_full.npz", "feats.npy", "class_map.json", "role.json")


@dataclass(frozen=True)
class PygSource:
    """A ``torch_geometric.datasets`` class and the files it expects in ``<root>/<name>/raw``."""

    cls: str
    raw_files: tuple[str, ...]


PYG = {
    "reddit": PygSource("Reddit", ("reddit_data.npz", "reddit_graph.npz")),
    "flickr": PygSource("Flickr", _SAINT_FILES),
    "yelp": PygSource("Yelp", _SAINT_FILES),
    "amazon-products": PygSource("AmazonProducts", _SAINT_FILES),
}
MULTILABEL = ("yelp", "amazon-products")


@dataclass(frozen=True)
class OgbSource:
    """The files ``PygNodePropPredDataset`` reads from ``<root>/<folder>`` (``ogb`` 1.3)."""

    folder: str
    raw_files: tuple[str, ...]
    split: str

    @property
    def files(self) -> tuple[str, ...]:
        """Paths relative to the dataset folder."""
        split = tuple(f"split/{self.split}/{s}.csv.gz" for s in ("train", "valid", "test"))
        return ("RELEASE_v1.txt", *(f"raw/{f}" for f in self.raw_files), *split)


_OGB_CSV = ("edge", "num-node-list", "num-edge-list", "node-feat", "node-label")
OGB = {
    "ogbn-arxiv": OgbSource(
        "ogbn_arxiv", tuple(f"{f}.csv.gz" for f in (*_OGB_CSV, "node_year")), "time"
    ),
    "ogbn-products": OgbSource(
        "ogbn_products", tuple(f"{f}.csv.gz" for f in _OGB_CSV), "sales_ranking"
    ),
    "ogbn-papers100M": OgbSource("ogbn_papers100M", ("data.npz", "node-label.npz"), "time"),
}

PYG_DATASETS = (*PLANETOID, *PYG, *OGB)


def load_pyg(name: str, root: Path) -> Data:
    """Dataset ``name`` (one of :data:`PYG_DATASETS`) from ``root``, with its official split."""
    if name in PLANETOID:
        return _load_planetoid(name, root)
    if name in PYG:
        return _load_pyg_class(name, root)
    return _load_ogb(name, root)


def _load_planetoid(name: str, root: Path) -> Data:
    """Cora / CiteSeer / PubMed, public split; raw files are checked against their SHA-256 first
    (they are pickles) unless ``BNS_PIPE_TRUST_RAW=1``."""
    title = PLANETOID[name]
    raw = root / "planetoid" / title / "raw"
    files = [f"ind.{name}.{part}" for part in _PLANETOID_PARTS]
    _require_files(
        name,
        raw,
        files,
        f"from torch_geometric.datasets import Planetoid; Planetoid('data/planetoid', '{title}')",
        f"data/planetoid/{title}/raw",
    )
    blobs = {f: (raw / f).read_bytes() for f in files}
    digests = {f: hashlib.sha256(blob).hexdigest() for f, blob in blobs.items()}
    if os.environ.get(TRUST_RAW_ENV) != "1":
        for f, digest in digests.items():
            if digest != PLANETOID_SHA256[f]:
                raise DatasetError(
                    f"{raw / f}: SHA-256 checksum mismatch (got {digest}, expected "
                    f"{PLANETOID_SHA256[f]}); it is a Python pickle, so it is not loaded. Restore "
                    f"the original file, or set {TRUST_RAW_ENV}=1 to load it unverified"
                )
    key = hashlib.sha256("".join(digests[f] for f in files).encode()).hexdigest()[:16]
    cache = cache_dir("pyg", "planetoid", key)
    with _locked(cache):
        for f, blob in blobs.items():
            _write_once(cache / title / "raw" / f, blob)
        from torch_geometric.datasets import Planetoid

        dataset = Planetoid(str(cache), title)
    return _as_data(dataset[0], dataset.num_classes)


def _load_pyg_class(name: str, root: Path) -> Data:
    """Reddit / Flickr / Yelp / AmazonProducts with the split their raw files provide."""
    source = PYG[name]
    raw = root / name / "raw"
    _require_files(
        name,
        raw,
        source.raw_files,
        f"from torch_geometric.datasets import {source.cls}; {source.cls}('data/{name}')",
        f"data/{name}/raw",
    )
    cache = cache_dir("pyg", name, _fingerprint([raw / f for f in source.raw_files]))
    with _locked(cache):
        for f in source.raw_files:
            _link(raw / f, cache / "raw" / f)
        from torch_geometric import datasets

        dataset = getattr(datasets, source.cls)(str(cache))
    data = _as_data(dataset[0], dataset.num_classes)
    data.multilabel = name in MULTILABEL
    return data


def _load_ogb(name: str, root: Path) -> Data:
    """An ``ogbn-*`` dataset with its official split; unlabelled nodes (NaN) get label -1."""
    source = OGB[name]
    folder = root / source.folder
    _require_files(
        name,
        folder,
        source.files,
        "from ogb.nodeproppred import PygNodePropPredDataset; "
        f"PygNodePropPredDataset('{name}', root='data')",
        f"data/{source.folder}",
    )
    cache = cache_dir("ogb", name, _fingerprint([folder / f for f in source.files]))
    with _locked(cache):
        # Links for every file OGB reads, RELEASE_v1.txt included: without it OGB asks on stdin.
        for f in source.files:
            _link(folder / f, cache / source.folder / f)
        os.environ.setdefault("OUTDATED_IGNORE", "1")  # no PyPI version check at import
        from ogb.nodeproppred import PygNodePropPredDataset
        from torch_geometric.data.data import DataEdgeAttr, DataTensorAttr
        from torch_geometric.data.storage import GlobalStorage

        # OGB calls torch.load with torch's default weights_only=True; allow PyG's graph classes.
        with torch.serialization.safe_globals([DataEdgeAttr, DataTensorAttr, GlobalStorage]):
            dataset = PygNodePropPredDataset(name, root=str(cache))
        split = dataset.get_idx_split()
    graph = dataset[0]
    y = graph.y.view(-1)
    if y.is_floating_point():
        y = torch.where(y.isnan(), -1, y).to(torch.int64)
    n = graph.num_nodes
    masks = {}
    for key, part in (("train_mask", "train"), ("val_mask", "valid"), ("test_mask", "test")):
        masks[key] = torch.zeros(n, dtype=torch.bool)
        masks[key][split[part]] = True
    data = new_data(x=graph.x, y=y, edge_index=graph.edge_index, **masks)
    data.num_classes = dataset.num_classes
    return data


def _as_data(graph: Data, num_classes: int) -> Data:
    data = new_data(
        x=graph.x,
        y=graph.y,
        edge_index=graph.edge_index,
        train_mask=graph.train_mask,
        val_mask=graph.val_mask,
        test_mask=graph.test_mask,
    )
    data.num_classes = num_classes
    return data


def _require_files(name: str, folder: Path, files, code: str, made: str) -> None:
    """Raise :class:`DatasetError` listing the ``files`` missing under ``folder``."""
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DatasetError(
            f"{name}: missing {len(missing)} of {len(files)} expected files under {folder}: "
            f"{', '.join(missing)}. Nothing is downloaded; on a machine with internet access run\n"
            f'  python -c "{code}"\nthen copy {made} to {folder} (see datasets/README.md)'
        )


def _fingerprint(files: list[Path]) -> str:
    """A cache key that changes when any of ``files`` is replaced, resized or touched."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _link(target: Path, link: Path) -> None:
    """Make ``link`` a symlink to ``target`` (absolute), replacing whatever was there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def _write_once(path: Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` unless it is there (the cache folder is keyed by content)."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` so concurrent ranks process it only once."""
    with open(directory / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
