"""Compressed model files: ``bns-pipe compress`` writes them, ``bns-pipe eval`` and
:func:`bns_pipe.load_model` read them like checkpoints.

A file holds, for ``torch.load(weights_only=True)``: ``format`` (the string below), ``meta``
(UTF-8 JSON as uint8, at most 4 KB: the method, the model's options, every compressed
weight's shape), ``payload`` ({weight name: {field: tensor}}, the codec's fields, see
:mod:`bns_pipe.compress.codecs`) and ``dense`` (the other parameters and buffers as they
were: biases, norms, attention vectors). No optimiser or loop state. The compressed weights
are the conv layers' 2-D weights; ratio = their float32 bytes / their payload bytes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from bns_pipe.compress.codecs import Codec, IntCodec, KMeansCodec
from bns_pipe.compress.smartexchange import SmartExchangeCodec
from bns_pipe.errors import BnsPipeError
from bns_pipe.spec import build_from_spec

__all__ = [
    "CODECS",
    "FORMAT",
    "compress_state",
    "finetune_hook",
    "is_compressed",
    "parse_method",
    "read",
    "report",
    "write",
]

CODECS: dict[str, type[Codec]] = {
    codec.name: codec for codec in (KMeansCodec, IntCodec, SmartExchangeCodec)
}
FORMAT = "bns_pipe-compressed-1"
META_LIMIT = 4096
# the options that rebuild the model (the rest of a checkpoint's config is the run's)
MODEL_KEYS = (
    "model",
    "layers",
    "hidden",
    "heads",
    "dropout",
    "norm",
    "use_pp",
    "normalize_features",
    "sparse_features",
    "dtype",
    "seed",
)


def parse_method(spec: str) -> Codec:
    """A codec from ``name[:key=value,...]``; a :class:`ConfigError` names what is wrong."""
    return build_from_spec(spec, CODECS, "compression method")


def compressible(name: str, value: Tensor) -> bool:
    """The conv layers' weight matrices (not biases, norms or attention vectors)."""
    return name.startswith("convs.") and name.endswith("weight") and value.dim() == 2


def compress_state(
    state: dict[str, Tensor], config: dict, spec: str, hook_state: dict[str, Tensor] | None = None
) -> tuple[dict, list]:
    """The file's content for the model ``state`` and the per-weight table
    ``[(name, shape, float32 bytes, payload bytes)]``; ``hook_state`` (a checkpoint's weight
    hooks' own tensors) may tell the codec where to start (:meth:`Codec.hint`)."""
    codec = parse_method(spec)
    payload, dense, table = {}, {}, []
    for name, value in state.items():
        if not compressible(name, value):
            dense[name] = value
            continue
        fields = codec.encode(value, **codec.hint(hook_state or {}, name.rsplit(".", 1)[0]))
        payload[name] = fields
        stored = sum(t.numel() * t.element_size() for t in fields.values())
        table.append((name, tuple(value.shape), value.numel() * 4, stored))
    if not table:
        raise BnsPipeError("the checkpoint holds no conv weights to compress")
    meta = {
        "method": spec,
        "config": {k: config[k] for k in MODEL_KEYS if k in config},
        "shapes": {name: list(shape) for name, shape, _, _ in table},
    }
    encoded = json.dumps(meta, separators=(",", ":")).encode()
    if len(encoded) > META_LIMIT:
        raise BnsPipeError(f"metadata of {len(encoded)} bytes exceeds {META_LIMIT}")
    meta_tensor = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    return {"format": FORMAT, "meta": meta_tensor, "payload": payload, "dense": dense}, table


def report(table: list) -> tuple[str, dict]:
    """The per-weight table of :func:`compress_state` as text, and ``{"ratio", "layers"}``
    (float32 bytes / payload bytes, in total and per weight)."""
    lines = [f"{'weight':<24} {'shape':>12} {'float32 B':>11} {'payload B':>10} {'ratio':>7}"]
    rows = [
        (name, "x".join(map(str, shape)), dense, stored) for name, shape, dense, stored in table
    ]
    rows.append(("total", "", sum(r[2] for r in table), sum(r[3] for r in table)))
    for name, shape, dense, stored in rows:
        lines.append(f"{name:<24} {shape:>12} {dense:>11} {stored:>10} {dense / stored:>7.2f}")
    layers = {name: dense / stored for name, _, dense, stored in rows[:-1]}
    return "\n".join(lines), {"ratio": rows[-1][2] / rows[-1][3], "layers": layers}


def write(path: str | os.PathLike, content: dict) -> None:
    """Write atomically: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(content, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finetune_hook(spec: str) -> str:
    """The ``--hook`` spec that trains in the form of method ``spec`` from the first epoch:
    the hook of the codec's name with the codec's options (and its ``finetune_options``)."""
    codec = parse_method(spec)
    extra = codec.finetune_options
    if not extra:
        return spec
    return f"{spec},{extra}" if ":" in spec else f"{spec}:{extra}"


def is_compressed(blob: object) -> bool:
    return isinstance(blob, dict) and blob.get("format") == FORMAT


def read(blob: dict, source: str) -> dict:
    """A loaded compressed file as a checkpoint's ``{"model": state, "config": options}``
    (weights decompressed in the model's ``dtype``) and ``"compressed_with"``, its method."""
    try:
        meta = json.loads(bytes(blob["meta"].tolist()).decode())
        codec = parse_method(meta["method"])
        state = dict(blob["dense"])
        dtype = getattr(torch, meta["config"].get("dtype", "float32"))
        for name, fields in blob["payload"].items():
            shape = tuple(meta["shapes"][name])
            weight = codec.decode(fields, shape)
            if weight.numel() != math.prod(shape):
                raise ValueError(f"{name} decodes to {weight.numel()} values")
            state[name] = weight.to(dtype)
    except (KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise BnsPipeError(f"compressed file {source} is corrupt: {exc}") from None
    return {"model": state, "config": meta["config"], "compressed_with": meta["method"]}
