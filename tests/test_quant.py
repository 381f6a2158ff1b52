"""Halo-message quantization (``--hook quant``): unbiased stochastic rounding on a per-row grid
with clamping, exact constant rows, the packed layout, the hook in distributed training and its
bad options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bns_pipe import _ext
from bns_pipe.errors import ConfigError
from bns_pipe.hooks import BytePayload, EpochContext, Message
from bns_pipe.hooks.bit_allocation import BITS, allocate, code_bytes, message_bytes
from bns_pipe.hooks.quant import QUANT_STREAM, QuantHook, dequantize, quantize, row_bytes
from bns_pipe.random import stream_key
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
        ("quant:bits=four", "bits"),
        ("quant:bits=adaptive", "takes budget=B"),
        ("quant:bits=adaptive,budget=9", r"budget must be in \[2, 8\]"),
        ("quant:bits=adaptive,budget=1.5", r"budget must be in \[2, 8\]"),
        ("quant:bits=adaptive,budget=4,fwd_bits=8", "not fwd_bits"),
        ("quant:bits=4,budget=4", "budget goes with bits=adaptive"),
        ("quant:bits=adaptive,budget=x", "could not convert"),
    ],
)
def test_bad_bits_are_rejected(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(hook=[spec]).validate()


def fit_records(tmp: Path, world: int = 2, **options) -> list[dict]:
    """Train on ``world`` ranks (``options``: TrainConfig fields); the metrics file's records."""
    from tests.distributed import run_ranks
    from tests.test_pipeline import _fit_worker

    metrics = tmp / f"{len(list(tmp.glob('*.jsonl')))}.jsonl"
    config = TrainConfig(metrics_jsonl=str(metrics), progress=False, **options)
    run_ranks(_fit_worker, world, config, timeout=120)
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


def weighted_variance(variance: torch.Tensor, bits: torch.Tensor) -> float:
    return float((variance / ((2.0**bits) - 1) ** 2).sum())


def test_adaptive_widths_keep_each_message_within_budget() -> None:
    """Per message the codes fit the uniform budget's bytes; rows that add more variance get
    more bits; constant rows (V = 0) stay at 2 bits; the weighted variance is below uniform
    4 bits; the allocation is deterministic."""
    gen = torch.Generator().manual_seed(0)
    rows, width = [30, 0, 17, 50], 13
    variance = torch.rand(97, generator=gen, dtype=torch.float64) ** 4 * 100
    variance[::9] = 0.0
    bits = allocate(variance, rows, width, 4.0)
    assert set(bits.tolist()) <= set(BITS) and torch.equal(
        bits, allocate(variance, rows, width, 4.0)
    )
    for message_bits in bits.split(rows):
        used = sum(code_bytes(width, b) for b in message_bits.tolist())
        assert used <= len(message_bits) * code_bytes(width, 4)
    assert (bits[::9] == 2).all()
    first = slice(0, 30)  # within a message, more variance never gets fewer bits
    order = torch.argsort(variance[first])
    assert (bits[first][order].diff() >= 0).all()
    assert weighted_variance(variance, bits) < 0.8 * weighted_variance(
        variance, torch.full_like(bits, 4)
    )
    # equal rows: nothing to trade, uniform 4 bits; budget 8: every row with variance at 8
    assert (allocate(torch.ones(8, dtype=torch.float64), [8], 16, 4.0) == 4).all()
    assert (allocate(variance, rows, width, 8.0)[variance > 0] == 8).all()


def adaptive_roundtrip(rows: torch.Tensor, counts: list[int], budget: float) -> tuple:
    """One process plays both sides of a transfer whose peers send what they receive."""
    hook = QuantHook(bits="adaptive", budget=str(budget))
    hook.on_epoch(EpochContext(3, training=True, seed=5))
    ids = torch.arange(100, 100 + rows.shape[0])
    message = Message(1, "backward", ids, torch.arange(rows.shape[0]), tuple(counts), tuple(counts))
    payload = hook.on_send(message, rows)
    assert isinstance(payload, BytePayload) and payload.data.dtype == torch.uint8
    arriving = BytePayload(payload.data.clone(), payload.send_bytes, payload.recv_bytes)
    return payload, hook.on_receive(message, arriving), hook


def test_adaptive_payload_roundtrips_at_its_fixed_size() -> None:
    """Each message is message_bytes(n, F, B) long; every row decodes to within one step of
    its grid, as uniform quantization at its width would (same keyed draws); wide-range rows
    travel at 8 bits and near-constant ones at 2."""
    gen = torch.Generator().manual_seed(1)
    counts = [5, 0, 9]
    x = torch.randn(14, 12, generator=gen) * torch.logspace(-4, 2, 14)[:, None]
    payload, y, hook = adaptive_roundtrip(x, counts, 4.0)
    assert payload.send_bytes == [message_bytes(n, 12, 4.0) for n in counts]
    assert payload.data.numel() == sum(payload.send_bytes)
    spread = (x.amax(1) - x.amin(1)).double() ** 2 * 3
    bits = torch.cat([allocate(s, [len(s)], 12, 4.0) for s in spread.split(counts)])
    key = stream_key(5, QUANT_STREAM, 3, 1, 1)
    for b in BITS:
        pick = bits == b
        expected = dequantize(quantize(x[pick], b, key, 100 + pick.nonzero()[:, 0]), b, 12, x.dtype)
        assert torch.equal(y[pick], expected)
    assert bits[-1] == 8 and bits[0] == 2 and bits[5] == 2  # widest rows last, of each message
    report = hook.report()
    assert report["avg_bits_backward"] <= 4.0 and report["variance_vs_uniform"] < 1.0
    empty, rows, _ = adaptive_roundtrip(torch.zeros(0, 12), [0, 0], 4.0)
    assert rows.shape == (0, 12) and empty.send_bytes == [0, 0]


@pytest.mark.parametrize(
    "world, mode",
    [(2, {}), (4, {"pipeline": True, "sampling_rate": 0.5})],
    ids=["sync-2", "pipe-bns-4"],
)
def test_adaptive_training_stays_close_within_the_budget(
    tmp_path: Path, world: int, mode: dict
) -> None:
    """budget 4: losses within 1e-2 relative of the unquantized run; synchronous bytes are
    the fixed message sizes, the codes at most uniform 4 bits' bytes."""
    from bns_pipe.partition import load_partition, partition
    from tests.test_gold import gold_dataset

    partition(gold_dataset("synthetic"), world, tmp_path / "p", verbose=False)
    parts = [load_partition(tmp_path / "p", r) for r in range(world)]
    common = {"partition_dir": str(tmp_path / "p"), "epochs": 4, "hidden": 16, "layers": 2, **mode}
    plain = fit_records(tmp_path, world=world, **common)
    quant = fit_records(tmp_path, world=world, hook=["quant:bits=adaptive,budget=4"], **common)
    losses = [torch.tensor([r["loss"] for r in run if "epoch" in r]) for run in (plain, quant)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=0)
    report = quant[-1]["hooks"]["quant"]
    assert report["budget"] == 4.0 and report["variance_vs_uniform"] <= 1.0
    if not mode:
        sizes = [len(ids) for part in parts for ids in part.send_ids]
        expected = 2 * sum(message_bytes(n, 16, 4) + message_bytes(n, 5, 4) for n in sizes)
        assert [r["comm_bytes"] for r in quant if "epoch" in r] == [expected] * 4
        uniform = 2 * sum(sizes) * (row_bytes(16, 4) + row_bytes(5, 4))
        assert uniform < expected <= uniform + 2 * sum(math.ceil(n / 4) * 2 for n in sizes)
