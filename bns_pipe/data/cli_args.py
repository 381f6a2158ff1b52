"""The dataset catalog: names, the options each takes, and the command-line flags and JSON spec
that choose one.

A spec is ``{"name": str, "options": {option: value}}`` with exactly the options the dataset
takes, defaults filled in and keys sorted, so ``json.dumps(spec, sort_keys=True)`` can key a
cache. The data root is deliberately not part of it.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bns_pipe.data.npz import NPZ_DATASETS, load_npz
from bns_pipe.data.pyg import PYG_DATASETS
from bns_pipe.data.synthetic import synthetic_graph
from bns_pipe.errors import DatasetError

NPZ_PREFIX = "npz:"
DATASETS = ("synthetic", *NPZ_DATASETS, *PYG_DATASETS)


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` takes, with their defaults (the loader's own defaults)."""
    if name == "synthetic":
        return _keyword_defaults(synthetic_graph)
    if name.startswith(NPZ_PREFIX) or name in NPZ_DATASETS:
        return _keyword_defaults(load_npz)
    if name in PYG_DATASETS:
        return {}
    raise DatasetError(
        f"unknown dataset {name!r}; supported: {', '.join(DATASETS)}, or {NPZ_PREFIX}PATH"
    )


def add_dataset_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Add ``--dataset``, ``--root`` and every dataset option to ``parser`` (or a group)."""
    synthetic, npz = _keyword_defaults(synthetic_graph), _keyword_defaults(load_npz)
    parser.add_argument(
        "--dataset",
        type=_dataset_name,
        required=required,
        default=None if required else "synthetic",
        metavar="NAME",
        help=f"one of {', '.join(DATASETS)}, or {NPZ_PREFIX}PATH (default: %(default)s)",
    )
    parser.add_argument(
        "--root", help="dataset root (default: $BNS_PIPE_DATA, else ./data); not used by synthetic"
    )
    parser.add_argument(
        "--data-seed",
        type=int,
        default=synthetic["data_seed"],
        help="seed of the synthetic graph and of random splits (default: %(default)s)",
    )
    for flag, kind, text in (
        ("num_nodes", int, "synthetic: nodes"),
        ("avg_degree", float, "synthetic: directed edges per node, approximate"),
        ("num_features", int, "synthetic: feature dimension"),
        ("num_classes", int, "synthetic: classes"),
    ):
        parser.add_argument(
            "--" + flag.replace("_", "-"),
            type=kind,
            default=synthetic[flag],
            help=f"{text} (default: %(default)s)",
        )
    parser.add_argument(
        "--split-index",
        type=int,
        default=npz["split_index"],
        help="npz datasets with (S, N) masks: which split (default: %(default)s)",
    )


def dataset_spec_from_args(args: argparse.Namespace) -> dict:
    """``{"name", "options"}`` for the dataset the parsed flags choose; an ``npz:`` path is made
    absolute so the spec means the same file from any working directory."""
    name = args.dataset
    if name.startswith(NPZ_PREFIX):
        name = NPZ_PREFIX + str(Path(name[len(NPZ_PREFIX) :]).expanduser().resolve())
    defaults = dataset_options(name)
    options = {key: type(value)(getattr(args, key, value)) for key, value in defaults.items()}
    return {"name": name, "options": dict(sorted(options.items()))}


def _dataset_name(name: str) -> str:
    try:
        dataset_options(name)
    except DatasetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return name


def _keyword_defaults(loader: Callable) -> dict[str, Any]:
    return {
        key: p.default
        for key, p in inspect.signature(loader).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
