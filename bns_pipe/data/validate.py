"""Checks a node-classification graph and brings it to the form every bns_pipe module expects.

The canonical form of a graph with N nodes, F features and C classes:

- ``x``: float32, dense, (N, F), finite;
- ``y``: int64, (N,) class ids in ``[0, C)`` (``-1`` marks an unlabelled node outside every
  mask), or (N, C) of 0/1 when ``multilabel``;
- ``train_mask``, ``val_mask``, ``test_mask``: bool, (N,), pairwise disjoint, train non-empty;
- ``edge_index``: int64, (2, E), undirected (``(u, v)`` present iff ``(v, u)`` is), no
  self-loops, no duplicates, sorted by ``(src, dst)`` (the row-major order of the adjacency);
- ``num_classes: int`` and ``multilabel: bool`` as plain attributes.

All checks are vectorised: ``key = src * N + dst`` turns an edge into one int64, so sorting,
de-duplication and the symmetry test are numpy sorts (``np.unique`` is avoided: it is far
slower than ``np.sort`` at 10^7+ elements).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from bns_pipe.errors import DatasetError

if TYPE_CHECKING:
    from torch_geometric.data import Data

log = logging.getLogger(__name__)

MASKS = ("train_mask", "val_mask", "test_mask")


def new_data(**attributes) -> Data:
    """``torch_geometric.data.Data(**attributes)``, importing PyG only when a graph is made
    (so training from a stored partition and the CLI start without it)."""
    from torch_geometric.data import Data

    return Data(**attributes)


def validate_data(data: Data, name: str = "data") -> Data:
    """A new ``Data`` holding ``data``'s graph in canonical form (see the module docstring).

    A directed graph is symmetrised, and self-loops and duplicate edges are dropped, with a
    one-line notice on the ``bns_pipe.data.validate`` logger. ``num_classes`` is inferred as
    ``max(y) + 1`` when absent; ``multilabel`` defaults to False. Anything that cannot be
    repaired raises :class:`DatasetError` naming ``name``. Other attributes are not carried over.
    """
    for key in ("edge_attr", "edge_weight"):
        if getattr(data, key, None) is not None:
            raise DatasetError(f"{name}: edge features ({key}) are not supported; delete them")
    x = _features(data, name)
    n = x.size(0)
    multilabel = bool(getattr(data, "multilabel", False))
    y = _labels(data.y, n, multilabel, name)
    num_classes = _num_classes(getattr(data, "num_classes", None), y, multilabel, name)
    masks = _masks(data, n, name)
    if not multilabel:
        in_split = masks["train_mask"] | masks["val_mask"] | masks["test_mask"]
        if bool((y[in_split] < 0).any()):
            raise DatasetError(f"{name}: nodes in a train/val/test mask have label -1")
    edge_index = _edges(data.edge_index, n, name)
    out = new_data(x=x, y=y, edge_index=edge_index, **masks)
    out.num_classes = num_classes
    out.multilabel = multilabel
    return out


def canonical_edge_index(edge_index: Tensor, num_nodes: int, name: str = "data") -> Tensor:
    """The undirected, loop-free, duplicate-free, ``(src, dst)``-sorted form of ``edge_index``.

    ``edge_index`` (2, E) int64 with ids in ``[0, num_nodes)``. Returns the input itself when it
    is canonical already (one sort of the reversed keys checks that); otherwise logs the edges
    it added or dropped.
    """
    src, dst = edge_index.numpy()
    key = src * num_nodes + dst
    loops = src == dst
    if not loops.any() and bool((key[1:] > key[:-1]).all()):
        reverse = dst * num_nodes + src
        reverse.sort()
        if np.array_equal(reverse, key):
            return edge_index
    keep = ~loops
    distinct = _sorted_unique(key[keep]).size
    out = undirected_edge_index(src, dst, num_nodes)
    fixes = {
        "reverse edges added": out.size(1) - distinct,
        "self-loops dropped": int(loops.sum()),
        "duplicate edges dropped": int(keep.sum()) - distinct,
    }
    if any(fixes.values()):
        done = ", ".join(f"{count:,} {what}" for what, count in fixes.items() if count)
        log.warning("%s: canonicalised edge_index: %s", name, done)
    return out


def undirected_edge_index(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> Tensor:
    """Canonical ``edge_index`` (2, E) of the undirected graph with edges ``{src_i, dst_i}``.

    ``src``, ``dst``: int64 (M,) node ids; pairs with ``src_i == dst_i`` are dropped.
    """
    keep = src != dst
    src, dst = src[keep], dst[keep]
    key = _sorted_unique(np.concatenate([src * num_nodes + dst, dst * num_nodes + src]))
    out = np.empty((2, key.size), dtype=np.int64)
    np.divmod(key, num_nodes, out=(out[0], out[1]))
    return torch.from_numpy(out)


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of 1-D ``a`` (sorts ``a`` in place)."""
    a.sort()
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if a.size else a


def _features(data: Data, name: str) -> Tensor:
    x = data.x
    if not isinstance(x, Tensor):
        raise DatasetError(f"{name}: node features data.x are missing (need a (N, F) tensor)")
    if x.layout != torch.strided:
        x = x.to_dense()
    if x.dim() != 2:
        raise DatasetError(f"{name}: data.x must be (N, F), got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise DatasetError(f"{name}: data.x must be real-valued, got {x.dtype}")
    x = x.to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise DatasetError(f"{name}: data.x holds NaN or infinite values")
    if data.num_nodes != x.size(0):
        raise DatasetError(
            f"{name}: data.num_nodes = {data.num_nodes}, but data.x has {x.size(0)} rows"
        )
    return x


def _labels(y: Tensor | None, n: int, multilabel: bool, name: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise DatasetError(f"{name}: labels data.y are missing")
    if multilabel:
        if y.dim() != 2 or y.size(0) != n:
            raise DatasetError(
                f"{name}: multilabel data.y must be (N, C) = ({n}, C), got {_shape(y)}"
            )
        if not bool(((y == 0) | (y == 1)).all()):
            raise DatasetError(f"{name}: multilabel data.y must hold only 0 and 1")
        return y.to(torch.int64).contiguous()
    if y.dim() == 2 and y.size(1) == 1:
        y = y.view(-1)
    if y.dim() != 1 or y.size(0) != n:
        hint = "; set data.multilabel = True for (N, C) targets" if y.dim() == 2 else ""
        raise DatasetError(f"{name}: data.y must be ({n},), got {_shape(y)}{hint}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise DatasetError(f"{name}: data.y must hold integer class ids, got {y.dtype}")
    y = y.to(torch.int64).contiguous()
    if n and int(y.min()) < -1:
        raise DatasetError(f"{name}: data.y has label {int(y.min())} (< -1)")
    return y


def _num_classes(declared: object, y: Tensor, multilabel: bool, name: str) -> int:
    needed = y.size(1) if multilabel else int(y.max()) + 1 if y.numel() else 0
    if declared is None:
        return needed
    if isinstance(declared, Tensor):
        declared = declared.item()
    if isinstance(declared, bool) or not isinstance(declared, int):
        raise DatasetError(f"{name}: data.num_classes must be an int, got {declared!r}")
    if declared < needed or (multilabel and declared != needed):
        raise DatasetError(f"{name}: data.num_classes = {declared} but the labels need {needed}")
    return declared


def _masks(data: Data, n: int, name: str) -> dict[str, Tensor]:
    masks = {}
    for key in MASKS:
        mask = getattr(data, key, None)
        if not isinstance(mask, Tensor):
            raise DatasetError(f"{name}: data.{key} is missing (need a bool tensor of shape (N,))")
        if mask.dtype != torch.bool:
            raise DatasetError(f"{name}: data.{key} must be bool, got {mask.dtype}")
        if tuple(mask.shape) != (n,):
            raise DatasetError(f"{name}: data.{key} must be ({n},), got {_shape(mask)}")
        masks[key] = mask.contiguous()
    if not bool(masks["train_mask"].any()):
        raise DatasetError(f"{name}: data.train_mask selects no node")
    train, val, test = masks.values()
    if bool((train & val).any() or (train & test).any() or (val & test).any()):
        raise DatasetError(f"{name}: train/val/test masks overlap")
    return masks


def _edges(edge_index: Tensor | None, n: int, name: str) -> Tensor:
    if not isinstance(edge_index, Tensor):
        raise DatasetError(f"{name}: data.edge_index is missing")
    if edge_index.dim() != 2 or edge_index.size(0) != 2:
        raise DatasetError(f"{name}: data.edge_index must be (2, E), got {_shape(edge_index)}")
    if edge_index.is_floating_point() or edge_index.dtype == torch.bool:
        raise DatasetError(f"{name}: data.edge_index must be integer, got {edge_index.dtype}")
    edge_index = edge_index.to(torch.int64).contiguous()
    if edge_index.numel() and (int(edge_index.min()) < 0 or int(edge_index.max()) >= n):
        low, high = int(edge_index.min()), int(edge_index.max())
        raise DatasetError(f"{name}: data.edge_index has ids in [{low}, {high}], need [0, {n})")
    return canonical_edge_index(edge_index, n, name)


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))
