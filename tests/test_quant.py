"""Halo-message quantization (``--hook quant``): unbiased stochastic rounding on a per-row grid
with clamping, exact constant rows, the packed layout, the hook in distributed training and its
bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bns_pipe import _ext
from bns_pipe.errors import ConfigError
from bns_pipe.hooks.quant import dequantize, quantize, row_bytes
from bns_pipe.train.config import TrainConfig


def roundtrip(rows: torch.Tensor, bits: int, key: int = 7) -> torch.Tensor:
    payload = quantize(rows, bits, key, torch.arange(rows.shape[0]))
    assert payload.dtype == torch.uint8 and payload.shape == (rows.shape[0], row_bytes(12, bits))
    return dequantize(payload, bits, rows.shape[1], rows.dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rounding_is_unbiased_with_bounded_variance(bits: int) -> None:
    """Over 1,000 keys the mean is within 3 standard errors of x (the rounding's own,
    step·sqrt(f(1-f)), f the fractional grid position), every draw on the grid within one
    step of x, and the variance at most step²/4 per value."""
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 12, generator=gen) * torch.tensor([[1.0], [0.01], [100.0]])
    draws = torch.stack([roundtrip(x, bits, key) for key in range(1000)])
    meta = quantize(x, bits, 0, torch.arange(3))[:, -4:].reshape(-1).clone()
    lo, step = meta.view(torch.bfloat16).float().view(3, 2).split(1, 1)
    position = (x - lo) / step
    assert (position >= 0).all() and (position <= (1 << bits) - 1).all()  # no clamping needed
    f = position - position.floor()
    sem = step * (f * (1 - f)).sqrt() / 1000**0.5
    assert ((draws.mean(0) - x).abs() <= 3 * sem + 1e-6 * step).all()
    assert ((draws - x).abs() <= step * (1 + 1e-5)).all()
    codes = (draws - lo) / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)  # on the grid
    assert (draws.var(0) <= step**2 / 4 * 1.1).all()


def test_extremes_clamp_and_constant_rows_are_exact() -> None:
    x = torch.tensor([[0.0] * 12, [2.5] * 12, [-1.0] + [3.0] * 11, [1e-3] * 12])
    for bits in (2, 4, 8):
        y = roundtrip(x, bits)
        assert torch.equal(y[:2], x[:2])  # constant at a bfloat16 value: exact
        step = 4.0 / ((1 << bits) - 1)
        assert y[2, 0] == -1.0 and ((y[2, 1:] - 3.0).abs() <= step * 1.01).all()
        assert torch.allclose(y[3], x[3], rtol=1e-2)  # constant off bfloat16: one step
    empty = quantize(torch.zeros(0, 12), 4, 1, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, row_bytes(12, 4))
    assert dequantize(empty, 4, 12, torch.float32).shape == (0, 12)


def test_codes_are_packed_eight_bits_a_byte() -> None:
    """Column c of a row sits in byte c // (8/b) at bit (c mod 8/b)·b, then lo and step."""
    x = torch.arange(5, dtype=torch.float32).view(1, 5)  # lo 0, step 4/3 at 2 bits: codes 0..3
    payload = quantize(x, 2, 3, torch.zeros(1, dtype=torch.long))
    assert payload.shape == (1, 2 + 4)
    codes = [(int(payload[0, c // 4]) >> (2 * (c % 4))) & 3 for c in range(5)]
    assert codes[0] == 0 and codes[4] == 3 and codes == sorted(codes)
    assert int(payload[0, 1]) >> 2 == 0  # padding bits stay zero


@pytest.mark.skipif(not _ext.available(), reason="C++ extension not built")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cpp_equals_fallback_bit_for_bit(monkeypatch, bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(300, 13, generator=gen) * torch.logspace(-3, 3, 300)[:, None]
    x[::7] = 0.0  # constant rows
    x[1::7] = 1e-3
    ids = torch.randperm(10_000, generator=gen)[:300]
    native = quantize(x, bits, 99, ids)
    rows = dequantize(native, bits, 13, torch.float32)
    monkeypatch.setattr(_ext, "available", lambda: False)
    assert torch.equal(quantize(x, bits, 99, ids), native)
    assert torch.equal(dequantize(native, bits, 13, torch.float32), rows)


def test_same_rows_same_codes_whatever_the_order() -> None:
    """Draws are keyed by global row id: a permuted message quantizes each row alike."""
    x = torch.randn(20, 12)
    ids = torch.randperm(1000)[:20]
    perm = torch.randperm(20)
    a = quantize(x, 4, 11, ids)
    b = quantize(x[perm], 4, 11, ids[perm])
    assert torch.equal(a[perm], b)
    assert not torch.equal(a, quantize(x, 4, 12, ids))  # another key, other draws


@pytest.mark.parametrize(
    "spec, message",
    [
        ("quant:bits=3", "bits must be one of"),
        ("quant:bits=8,fwd_bits=16", "bits must be one of"),
        ("quant:bits=adaptive", "not available yet"),
        ("quant:bits=four", "bits"),
    ],
)
def test_bad_bits_are_rejected(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(hook=[spec]).validate()


def fit_records(tmp: Path, **options) -> list[dict]:
    """Train on 2 ranks (``options``: TrainConfig fields); the metrics file's records."""
    from tests.distributed import run_ranks
    from tests.test_pipeline import _fit_worker

    metrics = tmp / f"{len(list(tmp.glob('*.jsonl')))}.jsonl"
    config = TrainConfig(metrics_jsonl=str(metrics), progress=False, **options)
    run_ranks(_fit_worker, 2, config, timeout=120)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.mark.parametrize(
    "mode", [{}, {"pipeline": True, "sampling_rate": 0.5}], ids=["sync", "pipe-bns"]
)
def test_eight_bit_training_stays_close_and_bytes_follow(tmp_path: Path, mode: dict) -> None:
    """2 ranks, 5 epochs: 8-bit halo messages keep the losses within 1e-2 relative of the
    unquantized run; the bytes follow the row formula; evaluation stays exact."""
    from bns_pipe.partition import load_partition, partition
    from tests.test_gold import gold_dataset

    data = gold_dataset("synthetic")  # 32 features, 5 classes
    partition(data, 2, tmp_path / "p", verbose=False)
    sent = sum(
        int(ids.numel()) for r in range(2) for ids in load_partition(tmp_path / "p", r).send_ids
    )
    common = {"partition_dir": str(tmp_path / "p"), "epochs": 5, "hidden": 16, "layers": 2, **mode}
    plain = fit_records(tmp_path, **common)
    quant = fit_records(tmp_path, hook=["quant:bits=8"], **common)
    losses = [torch.tensor([r["loss"] for r in run if "epoch" in r]) for run in (plain, quant)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)
    assert not torch.equal(losses[1], losses[0])
    # the rows that travel are each layer's narrow side, x·Wᵀ (16 wide) and then 5 wide,
    # forward and as gradients backward
    epochs = [[r for r in run if "epoch" in r] for run in (plain, quant)]
    if not mode:
        assert epochs[0][0]["comm_bytes"] == 2 * sent * (16 + 5) * 4
        assert epochs[1][0]["comm_bytes"] == 2 * sent * (row_bytes(16, 8) + row_bytes(5, 8))
    else:  # sampled: fewer rows, but the same bytes a row
        ratio = (row_bytes(16, 8) + row_bytes(5, 8)) / ((16 + 5) * 4)
        assert epochs[1][-1]["comm_bytes"] < 0.6 * epochs[0][-1]["comm_bytes"]
        assert ratio < 0.6
    assert all(r["quantize_s"] > 0 for r in epochs[1])
    final = quant[-1]["hooks"]["quant"]
    assert final["avg_bits_forward"] == 8 == final["avg_bits_backward"]
    assert final["quantize_s"] > 0
    # evaluation is exact: the same weights would score the same; here, scores are sane
    assert 0 <= quant[-1]["best_val_acc"] <= 1
