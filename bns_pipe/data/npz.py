"""Graphs stored as pickle-free ``.npz`` archives (the format of ``datasets/README.md``).

Arrays, for N nodes, F features and E directed edges:

- ``edge_index`` int (2, E); ``y`` int (N,);
- features: dense ``x`` (N, F), or CSR ``x_indptr`` (N+1,), ``x_indices`` (nnz,),
  ``x_data`` (nnz,), ``x_shape`` = ``[N, F]`` (values used as stored; repeats summed);
- optional ``train_mask``, ``val_mask``, ``test_mask``: bool (N,) or (S, N) for S splits.

Without masks the split is 20 train and 30 validation nodes per class (Shchur et al., 2018),
the rest test, drawn from ``data_seed`` alone.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bns_pipe.data.validate import new_data
from bns_pipe.errors import DatasetError

if TYPE_CHECKING:
    from torch_geometric.data import Data

# Shared datasets stored as ``<root>/<name>.npz``.
NPZ_DATASETS = ("coauthor-cs", "coauthor-physics", "amazon-computers")
TRAIN_PER_CLASS = 20
VAL_PER_CLASS = 30

_MASKS = ("train_mask", "val_mask", "test_mask")
_CSR = ("x_indptr", "x_indices", "x_data", "x_shape")


def load_npz(path: Path, split_index: int = 0, data_seed: int = 0) -> Data:
    """The graph in ``path``; ``split_index`` picks a row of (S, N) masks, ``data_seed`` draws
    the per-class split when the file has no masks. Raises :class:`DatasetError` naming ``path``
    for a missing, corrupt or malformed file."""
    arrays = _read(path)
    edge_index = _array(arrays, "edge_index", path)
    if edge_index.ndim != 2 or edge_index.shape[0] != 2 or edge_index.dtype.kind not in "iu":
        raise DatasetError(f"{path}: edge_index must be an integer (2, E) array")
    x = _features(arrays, path)
    y = _array(arrays, "y", path)
    n = x.shape[0]
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise DatasetError(f"{path}: y must be an integer ({n},) array, got {y.dtype} {y.shape}")
    y = torch.from_numpy(y.astype(np.int64))
    if any(key in arrays for key in _MASKS):
        masks = _stored_masks(arrays, n, split_index, path)
    else:
        masks = per_class_split(y, TRAIN_PER_CLASS, VAL_PER_CLASS, data_seed)
    return new_data(x=x, y=y, edge_index=torch.from_numpy(edge_index.astype(np.int64)), **masks)


def per_class_split(y: torch.Tensor, num_train: int, num_val: int, seed: int) -> dict:
    """Masks with ``num_train`` train and ``num_val`` val nodes per class, the rest test.

    ``y`` (N,) int64; nodes labelled -1 are left out of every mask. Within each class the
    nodes are taken in a random order drawn from ``seed`` alone.
    """
    n = y.numel()
    labelled = np.flatnonzero(y.numpy() >= 0)
    shuffled = labelled[np.random.default_rng(seed).permutation(labelled.size)]
    labels = y.numpy()[shuffled]
    by_class = shuffled[np.argsort(labels, kind="stable")]
    counts = np.bincount(labels)
    rank = np.arange(by_class.size) - np.repeat(np.cumsum(counts) - counts, counts)
    masks = {key: torch.zeros(n, dtype=torch.bool) for key in _MASKS}
    masks["train_mask"][by_class[rank < num_train]] = True
    masks["val_mask"][by_class[(rank >= num_train) & (rank < num_train + num_val)]] = True
    masks["test_mask"][by_class[rank >= num_train + num_val]] = True
    return masks


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(
            f"{path}: no such file; point --root or $BNS_PIPE_DATA at the folder holding it "
            "(format and sources: datasets/README.md)"
        )
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path}: holds a single .npy array, not an .npz archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"{path}: not a readable pickle-free .npz archive ({exc})") from exc


def _array(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in arrays:
        raise DatasetError(f"{path}: missing array '{key}' (has: {', '.join(sorted(arrays))})")
    return arrays[key]


def _features(arrays: dict[str, np.ndarray], path: Path) -> torch.Tensor:
    """Dense float32 (N, F) features from ``x`` or from the four CSR arrays."""
    if "x" in arrays:
        x = arrays["x"]
        if x.ndim != 2 or x.dtype.kind not in "fiub":
            raise DatasetError(f"{path}: x must be a numeric (N, F) array, got {x.dtype} {x.shape}")
        return torch.from_numpy(x.astype(np.float32))
    indptr, indices, values, shape = (_array(arrays, key, path) for key in _CSR)
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or (shape < 0).any():
        raise DatasetError(f"{path}: x_shape must be [N, F], got {shape!r}")
    n, f = (int(v) for v in shape)
    nnz = indices.size
    if (
        indptr.shape != (n + 1,)
        or indices.shape != (nnz,)
        or values.shape != (nnz,)
        or indptr.dtype.kind not in "iu"
        or indices.dtype.kind not in "iu"
        or values.dtype.kind not in "fiub"
        or indptr[0] != 0
        or indptr[-1] != nnz
        or (np.diff(indptr) < 0).any()
        or (nnz and (indices.min() < 0 or indices.max() >= f))
    ):
        raise DatasetError(
            f"{path}: inconsistent CSR features: x_shape {[n, f]}, x_indptr {indptr.shape}, "
            f"x_indices {indices.shape}, x_data {values.shape}"
        )
    counts = torch.from_numpy(np.diff(indptr).astype(np.int64))
    rows = torch.repeat_interleave(torch.arange(n), counts)
    cols = torch.from_numpy(indices.astype(np.int64))
    x = torch.zeros(n, f)
    x.index_put_((rows, cols), torch.from_numpy(values.astype(np.float32)), accumulate=True)
    return x


def _stored_masks(arrays: dict, n: int, split_index: int, path: Path) -> dict[str, torch.Tensor]:
    """Row ``split_index`` of the file's (S, N) masks; (N,) masks are the single split 0."""
    masks = {}
    for key in _MASKS:
        mask = _array(arrays, key, path)
        if mask.dtype != np.bool_ or mask.ndim not in (1, 2) or mask.shape[-1] != n:
            raise DatasetError(f"{path}: {key} must be bool (N,) or (S, N) with N = {n}")
        splits = mask.reshape(-1, n)
        if not 0 <= split_index < splits.shape[0]:
            raise DatasetError(
                f"{path}: split_index {split_index} is out of range: the file has "
                f"{splits.shape[0]} split(s) (0..{splits.shape[0] - 1})"
            )
        masks[key] = torch.from_numpy(splits[split_index].copy())
    return masks
