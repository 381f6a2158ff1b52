"""Node-classification datasets as canonical ``torch_geometric.data.Data`` graphs.

Every loader returns what :func:`validate_data` documents: dense float32 ``x`` (N, F), int64
``y`` (N,) (or (N, C) of 0/1 when ``multilabel``), bool ``train_mask`` / ``val_mask`` /
``test_mask`` (N,), an undirected, loop-free, duplicate-free, ``(src, dst)``-sorted int64
``edge_index`` (2, E), and plain attributes ``num_classes: int`` and ``multilabel: bool``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bns_pipe.data.cli_args import (
    DATASETS,
    NPZ_PREFIX,
    add_dataset_arguments,
    dataset_options,
    dataset_spec_from_args,
)
from bns_pipe.data.npz import NPZ_DATASETS, load_npz
from bns_pipe.data.pyg import load_pyg
from bns_pipe.data.synthetic import synthetic_graph
from bns_pipe.data.validate import validate_data
from bns_pipe.errors import DatasetError
from bns_pipe.paths import data_root

if TYPE_CHECKING:
    from torch_geometric.data import Data

# Bumped whenever a loader's output changes, so caches of derived data (partitions) renew.
LOADER_VERSION = 2
# The named .npz datasets whose features PyG's own loader binarises (Coauthor: keyword counts).
BINARY_FEATURES = ("coauthor-cs", "coauthor-physics")

__all__ = [
    "DATASETS",
    "LOADER_VERSION",
    "add_dataset_arguments",
    "dataset_options",
    "dataset_spec_from_args",
    "load_dataset",
    "load_dataset_spec",
    "validate_data",
]


def load_dataset(name: str, root: str | os.PathLike | None = None, **options) -> Data:
    """Dataset ``name`` (see :data:`DATASETS`, or ``npz:PATH``) in canonical form.

    ``root``: where real datasets live (default ``$BNS_PIPE_DATA``, else ``./data``);
    ``options``: those :func:`dataset_options` lists for ``name`` (the rest keep defaults).
    """
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DatasetError(
            f"{name}: unknown option(s) {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) if allowed else 'none'}"
        )
    if name == "synthetic":
        data = synthetic_graph(**options)
    elif name.startswith(NPZ_PREFIX):
        data = load_npz(Path(name[len(NPZ_PREFIX) :]).expanduser(), **options)
    elif name in NPZ_DATASETS:
        data = load_npz(data_root(root) / f"{name}.npz", **options)
        if name in BINARY_FEATURES:  # the same x as torch_geometric.datasets.Coauthor
            data.x = (data.x > 0).to(data.x.dtype)
    else:
        data = load_pyg(name, data_root(root))
    return validate_data(data, name)


def load_dataset_spec(spec: dict, root: str | os.PathLike | None = None) -> Data:
    """The dataset a :func:`dataset_spec_from_args` spec names, from ``root``."""
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(spec.get("options", {}), dict)
    ):
        raise DatasetError(f'a dataset spec is {{"name": str, "options": dict}}, got {spec!r}')
    return load_dataset(spec["name"], root, **spec.get("options", {}))
