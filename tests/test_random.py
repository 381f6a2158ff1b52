"""Counter-based random stream and keyed dropout: exactness, C++/fallback identity, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from bns_pipe import _ext
from bns_pipe import random as rnd
from bns_pipe.nn.dropout import KeyedDropout, keyed_dropout

MASK64 = (1 << 64) - 1
KEYS = [rnd.stream_key(0), rnd.stream_key(7, 3, 1, 0, 2), 0, MASK64, 1 << 63, 12345]
EDGE_COUNTERS = [0, 1, -1, 2**63 - 1, -(2**63), 2**40, 123456789]

needs_ext = pytest.mark.skipif(
    not _ext.available(), reason="the C++ extension bns_pipe._C is not built (or disabled)"
)


def reference_bits(key: int, counter: int) -> int:
    """The specification on Python ints, written out independently of bns_pipe.random."""
    z = (key ^ (counter & MASK64)) & MASK64
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z >> 40


def random_counters(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randint(-(2**63), 2**63 - 1, (n,), dtype=torch.int64, generator=gen)
    return torch.cat([wide, torch.tensor(EDGE_COUNTERS), torch.arange(1000)])


@pytest.fixture(params=["cpp", "torch"])
def path(request, monkeypatch):
    """Run a test once on the C++ ops and once on the pure-PyTorch fallback."""
    if request.param == "cpp" and not _ext.available():
        pytest.skip("the C++ extension bns_pipe._C is not built (or disabled)")
    if request.param == "torch":
        monkeypatch.setattr(_ext, "available", lambda: False)
    return request.param


def test_mix_matches_known_splitmix64_outputs():
    # splitmix64 with state 0 yields mix(0), mix(gamma), ...; first outputs of the generator.
    assert rnd.mix(0) == 0xE220A8397B1DCDAF
    assert rnd.mix(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_stream_key_chains_fields():
    assert rnd.stream_key(5) == rnd.mix(5)
    assert rnd.stream_key(5, 6, 7) == rnd.mix(rnd.mix(rnd.mix(5) ^ 6) ^ 7)
    assert rnd.stream_key(-1) == rnd.mix(MASK64)
    assert rnd.stream_key(1, 2) != rnd.stream_key(2, 1)
    with pytest.raises(TypeError):
        rnd.stream_key()


@pytest.mark.parametrize("key", KEYS)
def test_uniform_matches_python_reference(path, key):
    counters = random_counters(3000, seed=key % 1000)
    u = rnd.uniform(key, counters)
    assert u.dtype == torch.float32 and u.shape == counters.shape
    expected = [reference_bits(key, c) * 2.0**-24 for c in counters.tolist()]
    assert u.tolist() == expected


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5 + 2**-30, 1.0])
def test_keep_mask_is_exact_comparison(path, p):
    key = rnd.stream_key(3, 1)
    counters = random_counters(20000, seed=1)
    keep = rnd.keep_mask(key, counters, p)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, rnd.uniform(key, counters).double() < p)


@needs_ext
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_cpp_equals_fallback(monkeypatch, p):
    key = rnd.stream_key(11, 2)
    counters = random_counters(60000, seed=2)[:60000].view(-1, 3)[:, ::2]  # non-contiguous
    cpp = (rnd.uniform(key, counters), rnd.keep_mask(key, counters, p))
    monkeypatch.setattr(_ext, "available", lambda: False)
    ref = (rnd.uniform(key, counters), rnd.keep_mask(key, counters, p))
    assert torch.equal(cpp[0].view(torch.int32), ref[0].view(torch.int32))
    assert torch.equal(cpp[1], ref[1])


def test_empty_counters(path):
    empty = torch.empty(0, dtype=torch.int64)
    assert rnd.uniform(1, empty).shape == (0,)
    assert rnd.keep_mask(1, empty, 0.5).shape == (0,)


def test_bad_input(path):
    with pytest.raises(TypeError):
        rnd.uniform(1, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError):
        rnd.keep_mask(1, torch.zeros(3, dtype=torch.int64), 1.5)


def test_uniformity(path):
    n = 1 << 20
    u = rnd.uniform(rnd.stream_key(42), torch.arange(n)).double()  # sequential counters
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    # chi-square over 256 equal bins: df = 255, mean 255, sd sqrt(510) ~ 22.6; 6 sd bound.
    counts = torch.bincount((u * 256).long(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)
    # Kolmogorov-Smirnov: sqrt(n) * D < 1.95 fails with probability ~ 0.001.
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert math.sqrt(n) * (ranks - u.sort().values).abs().max().item() < 1.95


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction(path, p):
    n = 200000
    kept = rnd.keep_mask(rnd.stream_key(5, 1), torch.arange(n) * 6805, p).double().mean().item()
    assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_different_keys_give_independent_streams():
    counters = torch.arange(1 << 16)
    keys = [rnd.stream_key(0, 1, 2), rnd.stream_key(0, 2, 1), rnd.stream_key(1, 1, 2)]
    streams = [rnd.uniform(k, counters).double() for k in keys]
    n = counters.numel()
    for i in range(len(streams)):
        for j in range(i):
            a, b = streams[i], streams[j]
            assert (a == b).sum().item() < 5  # equal 24-bit values: ~ n / 2^24 expected
            corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
            assert abs(corr) < 5 / math.sqrt(n)


# ---------------------------------------------------------------------------- keyed dropout


def dropout_input(rows: int = 300, cols: int = 37, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    row_ids = torch.randperm(10 * rows, generator=gen)[:rows]
    return x, row_ids


@pytest.mark.parametrize("p", [0.3, 0.75])
def test_dropout_is_keyed_by_global_row(path, p):
    x, row_ids = dropout_input()
    key = rnd.stream_key(0, 4, 1)
    whole = keyed_dropout(x, p, key, row_ids)
    halves = (slice(0, 120), slice(120, None))
    parts = torch.cat([keyed_dropout(x[h], p, key, row_ids[h]) for h in halves])
    assert torch.equal(whole, parts)
    perm = torch.randperm(x.shape[0])
    assert torch.equal(keyed_dropout(x[perm], p, key, row_ids[perm]), whole[perm])
    # The definition, element by element.
    counters = row_ids[:, None] * x.shape[1] + torch.arange(x.shape[1])
    kept = rnd.uniform(key, counters).double() >= p
    expected = torch.where(kept, x * torch.tensor(1 / (1 - p), dtype=x.dtype), 0)
    assert torch.equal(whole, expected)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.3, 0.5, 1.0])
def test_dropout_cpp_equals_fallback(monkeypatch, dtype, p):
    x, row_ids = dropout_input(rows=700, cols=3001, dtype=dtype)  # > one fallback chunk
    x = x.t().contiguous().t()  # non-contiguous input
    key = rnd.stream_key(9, 9)
    cpp = keyed_dropout(x, p, key, row_ids)
    monkeypatch.setattr(_ext, "available", lambda: False)
    ref = keyed_dropout(x, p, key, row_ids)
    assert cpp.dtype == ref.dtype == dtype
    assert torch.equal(cpp.view(torch.uint8), ref.view(torch.uint8))


def test_dropout_backward_uses_the_same_mask(path):
    x, row_ids = dropout_input(rows=40, cols=9, dtype=torch.float64)
    key, p = rnd.stream_key(1, 2, 3), 0.4
    x.requires_grad_()
    y = keyed_dropout(x, p, key, row_ids)
    grad = torch.randn_like(y)
    y.backward(grad)
    kept = y.detach() != 0
    assert torch.equal(x.grad, torch.where(kept, grad / (1 - p), 0))
    small = x.detach()[:6, :4].requires_grad_()
    rows = row_ids[:6]
    assert torch.autograd.gradcheck(lambda t: keyed_dropout(t, p, key, rows), (small,))
    assert torch.autograd.gradgradcheck(lambda t: keyed_dropout(t, p, key, rows), (small,))


def test_dropout_identity_cases(path):
    x, row_ids = dropout_input()
    assert keyed_dropout(x, 0.5, 1, row_ids, training=False) is x
    assert keyed_dropout(x, 0.0, 1, row_ids) is x
    assert torch.equal(keyed_dropout(x, 1.0, 1, row_ids), torch.zeros_like(x))
    module = KeyedDropout(0.5).eval()
    assert module(x, 1, row_ids) is x
    with pytest.raises(ValueError):
        keyed_dropout(x, -0.1, 1, row_ids)
    with pytest.raises(ValueError):
        keyed_dropout(x, 0.5, 1, row_ids[:-1])


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_kept_fraction_and_mean(path, p):
    x = torch.ones(2000, 64)
    y = KeyedDropout(p)(x, rnd.stream_key(3), torch.arange(2000))
    n = x.numel()
    kept = (y != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.all((y == 0) | (y == torch.tensor(1 / (1 - p), dtype=torch.float32)))
