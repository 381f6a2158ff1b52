"""The end of a hidden layer: bias, residual term, activation and the next layer's dropout.

For a layer's output h (R, C) before its bias::

    pre = (h + b) + r                  b (C,) the bias, r (R, C) a second term (SAGE's root)
    y   = D · act(pre)                 act = ReLU, ELU or the identity; D the keyed dropout of
                                       the *next* layer (:mod:`bns_pipe.nn.dropout`)

Unfused this is four or five passes over (R, C) forward and as many backward (add, add,
ReLU, dropout; their backwards and the bias gradient's sum). With the C++ extension
(``csrc/epilogue.cpp``) ReLU and the identity run as one pass forward, saving a uint8 mask of
the elements the output depends on, and one pass backward that also sums the bias gradient.
The values are those of the unfused ops bit for bit (the same additions in the same order,
the same dropout mask); the bias gradient differs by float rounding (summed in float64).
ELU (GAT), other dtypes and devices without the kernel take the unfused path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from bns_pipe import _ext
from bns_pipe.nn.dropout import dropout_scale, keyed_dropout
from bns_pipe.random import check_probability, has_ext_kernel, threshold, to_int64

__all__ = ["Epilogue", "plain"]

ACTIVATIONS = ("relu", "elu", "none")


def plain(h: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """``(h + bias) + residual`` with absent terms skipped: a conv layer's own end."""
    out = h if bias is None else h + bias
    return out if residual is None else out + residual


class _FusedEpilogue(Function):
    """One pass each way; see the module docstring."""

    @staticmethod
    def forward(ctx, h, bias, residual, relu: bool, key: int, row_ids, cut: int, scale: float):
        y, mask = _ext.ops().layer_epilogue(h, bias, residual, relu, key, row_ids, cut, scale)
        ctx.save_for_backward(mask)
        ctx.scale, ctx.has_bias, ctx.has_residual = scale, bias is not None, residual is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        grad_pre, grad_bias = _ext.ops().layer_epilogue_backward(
            grad, mask, ctx.scale, ctx.has_bias and ctx.needs_input_grad[1]
        )
        return (
            grad_pre,
            grad_bias if ctx.has_bias and ctx.needs_input_grad[1] else None,
            grad_pre if ctx.has_residual else None,
            *[None] * 5,
        )


class Epilogue:
    """``y = D · act((h + b) + r)``, D the keyed dropout with probability ``p`` (off when not
    ``training``), keyed by ``key`` and the rows' global ids ``row_ids`` (R,) int64."""

    def __init__(
        self, activation: str, p: float, key: int, row_ids: Tensor, training: bool = True
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")
        check_probability(p)
        self.activation, self.key, self.row_ids = activation, key, row_ids
        self.p = p if training else 0.0

    def __call__(self, h: Tensor, bias: Tensor | None = None, residual: Tensor | None = None):
        if self._fusable(h):
            return _FusedEpilogue.apply(
                h,
                bias,
                residual,
                self.activation == "relu",
                to_int64(self.key),
                self.row_ids,
                threshold(self.p),
                dropout_scale(self.p) if self.p > 0 else 1.0,
            )
        out = plain(h, bias, residual)
        if self.activation == "relu":
            out = torch.relu(out)
        elif self.activation == "elu":
            out = F.elu(out)
        return keyed_dropout(out, self.p, self.key, self.row_ids)

    def _fusable(self, h: Tensor) -> bool:
        return (
            self.activation != "elu"
            and h.dtype in (torch.float32, torch.float64)
            and h.dim() == 2
            and has_ext_kernel("layer_epilogue", h.device)
        )
