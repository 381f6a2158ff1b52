"""Boundary-node sampling: sender/receiver agreement, halo-block filtering, pack/scatter,
C++/fallback identity and unbiasedness of the scaled halo aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from bns_pipe import _ext
from bns_pipe.sampling import (
    BoundarySampler,
    filter_halo_block,
    pack_rows,
    scatter_add_rows,
    send_keep,
)
from bns_pipe.sparse import CSR, spmm

needs_ext = pytest.mark.skipif(
    not _ext.available(), reason=f"C++ extension not in use: {_ext.describe()}"
)
PS = [0.0, 0.3, 1.0]


def fake_ranks(k: int, n_inner: list[int], seed: int = 0) -> list[tuple[list, list[int]]]:
    """(send_ids, halo_counts) of k consistent ranks: i's halo group from j has
    len(send_ids_j[i]) nodes. A send list is a random subset of the owner's inner rows."""
    gen = torch.Generator().manual_seed(seed)

    def send_list(owner: int, receiver: int) -> torch.Tensor:
        if owner == receiver:
            return torch.empty(0, dtype=torch.int64)
        n = n_inner[owner]
        return torch.randperm(n, generator=gen)[: int(torch.randint(1, n, (1,), generator=gen))]

    send = [[send_list(j, i) for i in range(k)] for j in range(k)]
    return [(send[i], [send[j][i].numel() for j in range(k)]) for i in range(k)]


def random_halo(n_inner: int, n_halo: int, density: float, dtype, gen) -> tuple[CSR, torch.Tensor]:
    """A random halo block (every third row empty) and its dense form."""
    mask = torch.rand(n_inner, n_halo, generator=gen) < density
    mask[::3] = False
    dense = mask * torch.rand(n_inner, n_halo, generator=gen, dtype=dtype).add_(0.5)
    return CSR.from_dense(dense), dense


def to_dense(A: CSR) -> torch.Tensor:
    values = A.values if A.values is not None else torch.ones(A.nnz, dtype=torch.float64)
    dense = torch.zeros(A.shape, dtype=values.dtype)
    dense[A.row_ids(), A.indices] = values
    return dense


def assert_same_csr(A: CSR, B: CSR) -> None:
    assert A.shape == B.shape
    assert torch.equal(A.indptr, B.indptr) and torch.equal(A.indices, B.indices)
    assert (A.values is None) == (B.values is None)
    if A.values is not None:
        assert A.values.dtype == B.values.dtype and torch.equal(A.values, B.values)


def both_paths(monkeypatch, fn):
    """``fn()`` through the C++ ops and through the pure-PyTorch fallback."""
    with_ext = fn()
    with monkeypatch.context() as m:
        m.setattr(_ext, "available", lambda: False)
        fallback = fn()
    return with_ext, fallback


# --- the sample -------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.3, 0.75])
@pytest.mark.parametrize("k", [3, 4])
def test_sender_and_receiver_agree(k, p):
    ranks = fake_ranks(k, [50 + 13 * r for r in range(k)], seed=k)
    samplers = [BoundarySampler(7, r, k, send, halo, p) for r, (send, halo) in enumerate(ranks)]
    for epoch in range(4):
        samples = [s.sample(epoch) for s in samplers]
        for i in range(k):
            halo_groups = samples[i].halo_keep.split(ranks[i][1])
            for j in range(k):
                sent = samples[j].send_index.split(samples[j].send_splits)[i]
                assert samples[j].send_splits[i] == samples[i].recv_splits[j]
                assert int(halo_groups[j].sum()) == samples[i].recv_splits[j]
                # The receiver's kept halo positions name the rows the owner sent.
                assert torch.equal(ranks[j][0][i][halo_groups[j]], sent)


def test_samples_differ_between_epochs_and_repeat_within():
    send, halo = fake_ranks(3, [400, 500, 600])[1]
    sampler = BoundarySampler(3, 1, 3, send, halo, 0.5)
    a, b = sampler.sample(0), sampler.sample(1)
    assert not torch.equal(a.halo_keep, b.halo_keep)
    assert not torch.equal(a.send_index, b.send_index)
    again = sampler.sample(0)
    assert torch.equal(a.halo_keep, again.halo_keep) and torch.equal(a.send_index, again.send_index)
    assert a.sample_s >= 0 and a.epoch == 0 and a.n_kept_halo == int(a.halo_keep.sum())


def test_p_one_keeps_all_and_p_zero_none():
    send, halo = fake_ranks(4, [30, 40, 50, 60])[2]
    full = BoundarySampler(0, 2, 4, send, halo, 1.0).sample(5)
    assert torch.equal(full.send_index, torch.cat(send)) and bool(full.halo_keep.all())
    assert full.send_splits == [s.numel() for s in send] and full.recv_splits == halo
    none = BoundarySampler(0, 2, 4, send, halo, 0.0).sample(5)
    assert none.send_index.numel() == 0 and not bool(none.halo_keep.any())
    assert none.send_splits == [0] * 4 and none.recv_splits == [0] * 4
    assert bool(send_keep(1, 2, 3, 4, 1000, 1.0).all())
    assert not bool(send_keep(1, 2, 3, 4, 1000, 0.0).any())


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_kept_fraction_is_p(p):
    n = 200_000
    kept = sum(int(send_keep(11, epoch, 0, 1, n // 4, p).sum()) for epoch in range(4))
    # 5 binomial standard deviations.
    assert abs(kept / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_p_outside_unit_interval_raises(p):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        send_keep(0, 0, 0, 1, 10, p)
    send, halo = fake_ranks(2, [10, 10])[0]
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        BoundarySampler(0, 0, 2, send, halo, p)


def test_sampler_rejects_inconsistent_arguments():
    send, halo = fake_ranks(3, [10, 10, 10])[0]
    with pytest.raises(ValueError, match="one send list"):
        BoundarySampler(0, 0, 2, send, halo, 0.5)
    with pytest.raises(ValueError, match="outside"):
        BoundarySampler(0, 3, 3, send, halo, 0.5)


# --- filtering the halo block -----------------------------------------------------------------

# (n_inner, n_halo, density, keep probability): empty shapes, nnz = 0 and nothing kept included.
FILTER_CASES = [
    (30, 20, 0.3, 0.5),
    (64, 50, 0.2, 0.9),
    (25, 40, 0.1, 0.0),
    (20, 15, 0.0, 0.5),
    (12, 0, 0.5, 0.5),
    (0, 9, 0.5, 0.5),
    (0, 0, 0.5, 0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("n_inner", "n_halo", "density", "q"), FILTER_CASES)
def test_filter_halo_block_matches_dense(n_inner, n_halo, density, q, dtype):
    gen = torch.Generator().manual_seed(n_inner * 100 + n_halo)
    halo, dense = random_halo(n_inner, n_halo, density, dtype, gen)
    keep = torch.rand(n_halo, generator=gen) < q
    scale = 1 / 0.3
    block, block_t = filter_halo_block(halo, halo.transpose(), keep, scale)
    expected = dense[:, keep] * scale
    assert block.shape == (n_inner, int(keep.sum())) and block_t.shape == block.shape[::-1]
    assert block.values.dtype == dtype and block_t.values.dtype == dtype
    assert torch.equal(to_dense(block), expected)
    assert torch.equal(to_dense(block_t), expected.t())
    assert block.transpose() is block_t and block_t.transpose() is block
    # The filtered transpose is exactly what transposing the filtered block would build.
    assert_same_csr(
        block_t, CSR(block.indptr, block.indices, block.values, block.n_cols).transpose()
    )


@pytest.mark.parametrize(("n_inner", "n_halo", "density", "q"), FILTER_CASES)
def test_filter_keeping_everything_at_scale_one_is_identity(n_inner, n_halo, density, q):
    halo, _ = random_halo(n_inner, n_halo, density, torch.float32, torch.Generator().manual_seed(1))
    halo_t = halo.transpose()
    block, block_t = filter_halo_block(halo, halo_t, torch.ones(n_halo, dtype=torch.bool), 1.0)
    assert_same_csr(block, halo)
    assert_same_csr(block_t, halo_t)


def test_filter_without_values():
    halo, dense = random_halo(20, 30, 0.3, torch.float64, torch.Generator().manual_seed(2))
    pattern = halo.with_values(None)
    keep = torch.arange(30) % 3 != 0
    block, block_t = filter_halo_block(pattern, pattern.transpose(), keep, 1.0)
    assert block.values is None and block_t.values is None
    assert torch.equal(to_dense(block), (dense != 0)[:, keep].double())
    block, block_t = filter_halo_block(pattern, pattern.transpose(), keep, 2.0)
    assert block.values.dtype == torch.get_default_dtype()
    assert torch.equal(to_dense(block_t), 2.0 * (dense != 0)[:, keep].t().double())


def test_filter_rejects_bad_arguments():
    halo, _ = random_halo(10, 8, 0.5, torch.float32, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="col_keep"):
        filter_halo_block(halo, halo.transpose(), torch.ones(7, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="col_keep"):
        filter_halo_block(halo, halo.transpose(), torch.ones(8), 1.0)
    with pytest.raises(ValueError, match="transpose"):
        filter_halo_block(halo, halo, torch.ones(8, dtype=torch.bool), 1.0)


# --- pack / scatter ---------------------------------------------------------------------------

ROW_CASES = [(50, 16, 30), (50, 7, 200), (10, 130, 40), (10, 4, 0), (0, 4, 0), (20, 0, 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.3])
@pytest.mark.parametrize(("n", "F", "m"), ROW_CASES)
def test_pack_and_scatter_match_torch(n, F, m, scale, dtype):
    gen = torch.Generator().manual_seed(n + F + m)
    x = torch.randn(n, F, generator=gen, dtype=dtype)
    index = torch.randint(0, max(n, 1), (m,), generator=gen)  # m > n repeats rows
    packed = pack_rows(x, index, scale)
    assert packed.shape == (m, F) and packed.is_contiguous()
    assert torch.equal(packed, x.index_select(0, index) * scale)
    rows = torch.randn(m, F, generator=gen, dtype=dtype)
    out = torch.randn(n, F, generator=gen, dtype=dtype)
    expected = out.clone().index_add_(0, index, rows * scale)
    assert scatter_add_rows(out, index, rows, scale) is out
    assert torch.equal(out, expected)


def test_scatter_accumulates_duplicates():
    out = torch.zeros(3, 2, dtype=torch.float64)
    index = torch.tensor([2, 0, 2, 2])
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=torch.float64)
    scatter_add_rows(out, index, rows, 0.5)
    assert out.tolist() == [[1.5, 2.0], [0.0, 0.0], [6.5, 8.0]]


def test_pack_and_scatter_reject_bad_indices():
    x = torch.randn(5, 3)
    for bad in (torch.tensor([0, 5]), torch.tensor([-1])):
        with pytest.raises((IndexError, RuntimeError)):
            pack_rows(x, bad)
        with pytest.raises((IndexError, RuntimeError)):
            scatter_add_rows(x, bad, torch.ones(bad.numel(), 3))
    with pytest.raises(ValueError, match="rows must be"):
        scatter_add_rows(x, torch.tensor([0]), torch.ones(2, 3))


def test_scatter_on_a_non_contiguous_output():
    out = torch.zeros(4, 6)[:, ::2]
    scatter_add_rows(out, torch.tensor([1, 1, 3]), torch.ones(3, 3), 2.0)
    assert out.tolist() == [[0.0] * 3, [4.0] * 3, [0.0] * 3, [2.0] * 3]


# --- extension against fallback ---------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("p", PS)
def test_send_keep_and_sampler_same_on_both_paths(monkeypatch, p):
    send, halo = fake_ranks(4, [300, 200, 100, 250])[3]

    def run():
        sample = BoundarySampler(5, 3, 4, send, halo, p).sample(2)
        return send_keep(5, 9, 1, 2, 5000, p), sample

    (mask, a), (mask_fb, b) = both_paths(monkeypatch, run)
    assert torch.equal(mask, mask_fb)
    assert torch.equal(a.send_index, b.send_index) and torch.equal(a.halo_keep, b.halo_keep)
    assert (a.send_splits, a.recv_splits) == (b.send_splits, b.recv_splits)


@needs_ext
@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize(
    ("n_inner", "n_halo", "nnz"),
    [(300, 200, 3000), (20_000, 8000, 200_000), (0, 5, 0), (7, 0, 0), (9, 9, 0)],
)
def test_filter_same_on_both_paths(monkeypatch, n_inner, n_halo, nnz, p, dtype, with_values):
    """Sizes large enough for the C++ op to split rows among threads included."""
    gen = torch.Generator().manual_seed(n_inner + n_halo)
    row = torch.randint(0, max(n_inner, 1), (nnz,), generator=gen)
    col = torch.randint(0, max(n_halo, 1), (nnz,), generator=gen)
    values = torch.rand(nnz, generator=gen, dtype=dtype) if with_values else None
    halo = CSR.from_coo(row, col, (n_inner, n_halo), values)
    halo_t = halo.transpose()
    keep = send_keep(1, 2, 0, 1, n_halo, p)
    scale = 1 / p if p > 0 else 1.0
    (a, a_t), (b, b_t) = both_paths(
        monkeypatch, lambda: filter_halo_block(halo, halo_t, keep, scale)
    )
    assert_same_csr(a, b)
    assert_same_csr(a_t, b_t)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.3])
@pytest.mark.parametrize(
    ("n", "F", "m"), [(1000, 128, 5000), (300, 37, 2000), (2000, 3, 700), *ROW_CASES]
)
def test_pack_scatter_same_on_both_paths(monkeypatch, n, F, m, scale, dtype):
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(n, F, generator=gen, dtype=dtype)
    index = torch.randint(0, max(n, 1), (m,), generator=gen)
    rows = torch.randn(m, F, generator=gen, dtype=dtype)

    def run():
        return pack_rows(x, index, scale), scatter_add_rows(x.clone(), index, rows, scale)

    (packed, added), (packed_fb, added_fb) = both_paths(monkeypatch, run)
    assert torch.equal(packed, packed_fb)
    assert torch.equal(added, added_fb)


# --- unbiasedness -----------------------------------------------------------------------------


def test_scaled_sampled_aggregation_is_unbiased():
    """Mean over epochs of ``filter(A_halo, 1/p)·X_halo[kept]`` against ``A_halo·X_halo``,
    within 5 standard errors per element: ``Var = (1-p)/p · Σ_j a_ij² x_jf²`` per epoch."""
    p, epochs = 0.4, 400
    gen = torch.Generator().manual_seed(0)
    send, halo_counts = fake_ranks(3, [40, 60, 80])[0]
    n_halo = sum(halo_counts)
    halo, dense = random_halo(30, n_halo, 0.2, torch.float64, gen)
    halo_t = halo.transpose()
    x_halo = torch.randn(n_halo, 8, generator=gen, dtype=torch.float64)
    sampler = BoundarySampler(42, 0, 3, send, halo_counts, p)
    total = torch.zeros(30, 8, dtype=torch.float64)
    for epoch in range(epochs):
        keep = sampler.sample(epoch).halo_keep
        block, _ = filter_halo_block(halo, halo_t, keep, sampler.scale)
        total += spmm(block, x_halo[keep])
    exact = dense @ x_halo
    std_err = ((1 - p) / p * (dense**2 @ x_halo**2) / epochs).sqrt()
    assert bool(((total / epochs - exact).abs() <= 5 * std_err + 1e-12).all())
    assert float(std_err.max()) > 0


def test_filtered_block_gradient_flows_through_kept_rows_only():
    gen = torch.Generator().manual_seed(4)
    halo, dense = random_halo(12, 10, 0.4, torch.float64, gen)
    keep = torch.arange(10) % 2 == 0
    block, _ = filter_halo_block(halo, halo.transpose(), keep, 2.0)
    x = torch.randn(int(keep.sum()), 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, 3, dtype=torch.float64)
    spmm(block, x).backward(g)
    torch.testing.assert_close(x.grad, 2.0 * dense[:, keep].t() @ g)
