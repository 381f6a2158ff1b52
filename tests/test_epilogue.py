"""The fused layer epilogue (bias, second term, activation, keyed dropout) against the
unfused ops: the same values and gradients bit for bit, the bias gradient to rounding."""

from __future__ import annotations

import pytest
import torch

from bns_pipe import _ext
from bns_pipe import random as rnd
from bns_pipe.data import load_dataset
from bns_pipe.graph import LocalGraph
from bns_pipe.nn.epilogue import Epilogue
from bns_pipe.nn.model import GNN
from bns_pipe.partition import load_partition, partition

needs_ext = pytest.mark.skipif(not _ext.available(), reason="C++ extension not built")


def inputs(dtype: torch.dtype, rows: int = 300, cols: int = 301, seed: int = 0):
    """h (non-contiguous), bias, residual and shuffled global row ids."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(cols, rows, generator=g, dtype=dtype).t()
    bias = torch.randn(cols, generator=g, dtype=dtype)
    residual = torch.randn(rows, cols, generator=g, dtype=dtype)
    return h, bias, residual, torch.randperm(10 * rows, generator=g)[:rows]


def run(epilogue: Epilogue, h, bias, residual):
    """Output and gradients (h, bias, residual) for a fixed upstream gradient."""
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None for t in (h, bias, residual)
    ]
    y = epilogue(*leaves)
    upstream = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    y.backward(upstream)
    return y.detach(), [t.grad if t is not None else None for t in leaves]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("terms", ["bias", "residual", "both", "neither"])
def test_fused_equals_unfused(monkeypatch, dtype, activation, p, terms):
    h, bias, residual, row_ids = inputs(dtype)
    bias = bias if terms in ("bias", "both") else None
    residual = residual if terms in ("residual", "both") else None
    epilogue = Epilogue(activation, p, rnd.stream_key(3, 1, 2), row_ids)
    assert epilogue._fusable(h)
    fused, fused_grads = run(epilogue, h, bias, residual)
    monkeypatch.setattr(_ext, "available", lambda: False)
    assert not epilogue._fusable(h)
    ref, ref_grads = run(epilogue, h, bias, residual)
    assert torch.equal(fused, ref)
    assert torch.equal(fused_grads[0], ref_grads[0])
    if residual is not None:
        assert torch.equal(fused_grads[2], ref_grads[2])
    if bias is not None:  # summed in float64: the rounded exact column sum
        exact = fused_grads[0].double().sum(0)
        torch.testing.assert_close(fused_grads[1], exact.to(dtype), rtol=0, atol=1e-12)
        torch.testing.assert_close(fused_grads[1], ref_grads[1], rtol=0, atol=1e-4)
    if 0 < p < 1:  # the mask really drops about p of the elements
        assert 0.4 < (fused == 0).double().mean() < 0.8


@needs_ext
def test_fused_gradcheck_and_nan():
    h, bias, residual, row_ids = inputs(torch.float64, rows=7, cols=5)
    epilogue = Epilogue("relu", 0.3, 11, row_ids)
    leaves = (h.detach().requires_grad_(), bias.requires_grad_(), residual.requires_grad_())
    assert torch.autograd.gradcheck(epilogue, leaves)
    poisoned = h.detach().clone()
    poisoned[:, :] = float("nan")
    y = Epilogue("relu", 0.0, 11, row_ids)(poisoned)
    assert y.isnan().all()  # ReLU propagates NaN (the trainer's NaN check must see it)


def test_evaluation_and_bad_activation():
    h, bias, _, row_ids = inputs(torch.float32)
    y = Epilogue("relu", 0.5, 1, row_ids, training=False)(h, bias)
    assert torch.equal(y, torch.relu(h + bias))
    with pytest.raises(ValueError, match="activation"):
        Epilogue("gelu", 0.5, 1, row_ids)


@needs_ext
@pytest.mark.parametrize("conv", ["gcn", "sage"])
@pytest.mark.parametrize("norm", ["none", "layer"])
def test_model_fused_equals_unfused(monkeypatch, tmp_path, conv, norm):
    """A whole 3-layer model: logits and every parameter gradient, fused and unfused."""
    data = load_dataset("synthetic", num_nodes=400, num_features=24, num_classes=3)
    partition(data, 1, tmp_path / "p", verbose=False)
    part = load_partition(tmp_path / "p", 0)
    graph = LocalGraph(part)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = GNN(24, 32, 3, layers=3, conv=conv, norm=norm, dropout=0.5, seed=4)
        logits = model(graph, part.x, epoch=2)
        logits.square().sum().backward()
        return logits.detach(), [p.grad for p in model.parameters()]

    fused, fused_grads = step()
    monkeypatch.setattr(_ext, "available", lambda: False)
    ref, ref_grads = step()
    torch.testing.assert_close(fused, ref)
    for a, b in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
