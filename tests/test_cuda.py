"""The CUDA kernels of ``csrc/cuda`` against the CPU path, op by op, and one-rank training on
the GPU against the same run on the CPU. Skipped without a GPU (``launch/gpu_check.sh`` runs
them on a GPU machine)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bns_pipe.bench.suite import run_checked
from bns_pipe.nn.dropout import keyed_dropout
from bns_pipe.random import has_ext_kernel, keep_mask, uniform
from bns_pipe.sampling import filter_halo_block, pack_rows, scatter_add_rows, send_keep
from bns_pipe.sparse import CSR, spmm

CUDA_OPS = (
    "spmm",
    "filter_csr_columns",
    "filter_csr_rows",
    "pack_rows",
    "scatter_add_rows",
    "random_uniform",
    "random_keep_mask",
    "keyed_dropout_rows",
    "gat_attention",
    "gat_attention_backward",
    "quantize_rows",
    "dequantize_rows",
)
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU = torch.device("cuda")


def random_csr(n_rows: int, n_cols: int, density: float, seed: int) -> CSR:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=gen) < density
    mask[::5] = False  # empty rows
    return CSR.from_dense(mask * torch.rand(n_rows, n_cols, generator=gen).add_(0.5))


def test_every_op_has_a_cuda_kernel():
    missing = [op for op in CUDA_OPS if not has_ext_kernel(op, GPU)]
    assert not missing, f"extension built without these CUDA kernels: {missing}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spmm_and_its_backward(dtype):
    A = random_csr(300, 200, 0.05, 0)
    x = torch.randn(200, 33, dtype=dtype, requires_grad=True)
    acc = torch.randn(300, 33, dtype=dtype)
    y = spmm(A, x, acc)
    y.square().sum().backward()
    x_gpu = x.detach().to(GPU).requires_grad_()
    y_gpu = spmm(A.to(GPU), x_gpu, acc.to(GPU))
    y_gpu.square().sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(y_gpu.cpu(), y.detach(), **tol)
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, **tol)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_filter_halo_block(scale):
    halo = random_csr(400, 150, 0.04, 1)
    halo_t = halo.transpose()
    keep = torch.rand(150, generator=torch.Generator().manual_seed(2)) < 0.4
    want, want_t = filter_halo_block(halo, halo_t, keep, scale)
    got, got_t = filter_halo_block(halo.to(GPU), halo_t.to(GPU), keep.to(GPU), scale)
    for a, b in ((got, want), (got_t, want_t)):
        assert a.shape == b.shape
        assert torch.equal(a.indptr.cpu(), b.indptr) and torch.equal(a.indices.cpu(), b.indices)
        torch.testing.assert_close(a.values.cpu(), b.values)


def test_pack_and_scatter_rows():
    x = torch.randn(500, 40)
    index = torch.randint(0, 500, (900,))  # repeats accumulate
    rows = torch.randn(900, 40)
    packed = pack_rows(x.to(GPU), index.to(GPU), 0.5)
    torch.testing.assert_close(packed.cpu(), pack_rows(x, index, 0.5))
    want = scatter_add_rows(torch.zeros(500, 40), index, rows, 2.0)
    got = scatter_add_rows(torch.zeros(500, 40, device=GPU), index.to(GPU), rows.to(GPU), 2.0)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_random_streams_are_bit_identical(p):
    counters = torch.arange(-5, 100_000, 7, dtype=torch.int64)
    key = 0x1234_5678_9ABC
    assert torch.equal(uniform(key, counters.to(GPU)).cpu(), uniform(key, counters))
    assert torch.equal(keep_mask(key, counters.to(GPU), p).cpu(), keep_mask(key, counters, p))
    on_gpu = send_keep(3, 7, 1, 2, 10_000, p, device=GPU).cpu()
    assert torch.equal(on_gpu, send_keep(3, 7, 1, 2, 10_000, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keyed_dropout_is_bit_identical(dtype):
    x = torch.randn(700, 65, dtype=dtype)
    rows = torch.randperm(10_000)[:700]
    want = keyed_dropout(x, 0.3, 42, rows)
    assert torch.equal(keyed_dropout(x.to(GPU), 0.3, 42, rows.to(GPU)).cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gat_attention_and_its_backward(dtype, p):
    """The fused GAT op on the GPU against the CPU: output and both input gradients."""
    from tests.test_gat import attention_inputs, run_attention

    inputs = attention_inputs(dtype, heads=3, width=5)
    want = run_attention(*inputs, p, heads=3)
    got = run_attention(*[t.to(GPU) for t in inputs], p, heads=3)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_halo_quantization_is_bit_identical(bits):
    from bns_pipe.hooks.quant import dequantize, quantize

    x = torch.randn(500, 37) * torch.logspace(-3, 3, 500)[:, None]
    x[::9] = 0.0
    ids = torch.randperm(100_000)[:500]
    want = quantize(x, bits, 5, ids)
    got = quantize(x.to(GPU), bits, 5, ids.to(GPU))
    assert torch.equal(got.cpu(), want)
    back = dequantize(want, bits, 37, torch.float32)
    assert torch.equal(dequantize(want.to(GPU), bits, 37, torch.float32).cpu(), back)


@pytest.mark.parametrize("model", [["gcn"], ["gat", "--heads", "2"]], ids=["gcn", "gat"])
def test_one_rank_training_on_gpu_matches_cpu(tmp_path, model):
    """The same short run on both devices: the losses agree up to float32 summation order."""
    losses = {}
    for device in ("cpu", "cuda"):
        metrics = tmp_path / f"{device}.jsonl"
        command = [sys.executable, "-m", "bns_pipe", "train", "--num-nodes", "3000"]
        command += ["--model", *model]
        command += ["--epochs", "5", "--hidden", "32", "--device", device, "--no-progress"]
        command += ["--metrics-jsonl", str(metrics)]
        run_checked(command)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        losses[device] = torch.tensor([r["loss"] for r in rows if "epoch" in r])
    assert losses["cpu"].numel() == 5
    torch.testing.assert_close(losses["cuda"], losses["cpu"], rtol=1e-4, atol=1e-5)
