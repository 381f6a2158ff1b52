"""CSR and spmm against dense matmul; the C++ op against torch's sparse CSR fallback."""

from __future__ import annotations

import pytest
import torch

from bns_pipe import _ext
from bns_pipe.sparse import CSR, _spmm_ext, _spmm_torch, spmm

needs_ext = pytest.mark.skipif(
    not _ext.available(), reason=f"C++ extension not in use: {_ext.describe()}"
)

# (n_rows, n_cols, F, density): empty matrices, nnz = 0, n_cols = 0, F = 0 and F = 1 included.
SHAPES = [
    (7, 5, 3, 0.5),
    (40, 30, 1, 0.2),
    (40, 30, 17, 0.2),
    (33, 50, 64, 0.3),
    (20, 20, 5, 0.0),
    (0, 6, 4, 0.5),
    (6, 0, 4, 0.5),
    (12, 9, 0, 0.5),
]


def random_dense(n_rows: int, n_cols: int, density: float, dtype: torch.dtype, gen) -> torch.Tensor:
    """A dense matrix with about ``density`` nonzeros and every third row empty."""
    mask = torch.rand(n_rows, n_cols, generator=gen) < density
    mask[::3] = False
    return mask * torch.randn(n_rows, n_cols, generator=gen, dtype=dtype)


def random_csr(shape, density, dtype, with_values: bool, gen) -> tuple[CSR, torch.Tensor]:
    """A random CSR and its dense form (pattern of ones when ``with_values`` is False)."""
    dense = random_dense(*shape, density, dtype, gen)
    A = CSR.from_dense(dense)
    if with_values:
        return A, dense
    return A.with_values(None), (dense != 0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize(("n_rows", "n_cols", "F", "density"), SHAPES)
def test_spmm_matches_dense(dtype, with_values, n_rows, n_cols, F, density):
    gen = torch.Generator().manual_seed(n_rows * 1000 + n_cols * 10 + F)
    A, dense = random_csr((n_rows, n_cols), density, dtype, with_values, gen)
    X = torch.randn(n_cols, F, generator=gen, dtype=dtype)
    acc = torch.randn(n_rows, F, generator=gen, dtype=dtype)
    ref = dense @ X
    for Y in (spmm(A, X), _spmm_torch(A, X)):
        assert Y.shape == (n_rows, F) and Y.dtype == dtype
        torch.testing.assert_close(Y, ref)
    for Y in (spmm(A, X, acc), _spmm_torch(A, X, acc)):
        torch.testing.assert_close(Y, acc + ref)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("F", [1, 7, 16, 33, 72])
def test_extension_matches_fallback(dtype, with_values, F):
    gen = torch.Generator().manual_seed(F)
    n = 300
    row = torch.randint(0, n, (n * 9,), generator=gen)
    col = torch.randint(0, n, (n * 9,), generator=gen)
    values = torch.rand(n * 9, generator=gen, dtype=dtype) if with_values else None
    A = CSR.from_coo(row, col, (n, n), values)
    X = torch.randn(n, F, generator=gen, dtype=dtype)
    acc = torch.randn(n, F, generator=gen, dtype=dtype)
    torch.testing.assert_close(_spmm_ext(A, X), _spmm_torch(A, X))
    torch.testing.assert_close(_spmm_ext(A, X, acc), _spmm_torch(A, X, acc))
    At, G = A.transpose(), torch.randn(n, F, generator=gen, dtype=dtype)
    torch.testing.assert_close(_spmm_ext(At, G), _spmm_torch(At, G))


@needs_ext
def test_extension_rejects_bad_inputs():
    A = CSR.from_dense(torch.eye(3))
    X = torch.randn(3, 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _ext.ops().spmm(A.indptr, A.indices, None, X.half(), None)
    with pytest.raises(RuntimeError, match=r"indptr\[-1\]"):
        _ext.ops().spmm(A.indptr, A.indices[:2], None, X, None)
    with pytest.raises(RuntimeError, match="values"):
        _ext.ops().spmm(A.indptr, A.indices, A.values.double(), X, None)
    with pytest.raises(RuntimeError, match="acc"):
        _ext.ops().spmm(A.indptr, A.indices, None, X, torch.zeros(2, 2))


def test_spmm_rejects_bad_shapes():
    A = CSR.from_dense(torch.eye(3))
    with pytest.raises(ValueError, match="n_cols=3"):
        spmm(A, torch.randn(4, 2))
    with pytest.raises(ValueError, match="acc"):
        spmm(A, torch.randn(3, 2), torch.randn(3, 3))


@pytest.mark.parametrize("with_values", [True, False])
def test_gradcheck(with_values):
    gen = torch.Generator().manual_seed(0)
    A, _ = random_csr((9, 6), 0.4, torch.float64, with_values, gen)
    X = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    acc = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: spmm(A, x), (X,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, a: spmm(A, x, a), (X, acc), fast_mode=True)


def test_backward_matches_dense_and_uses_cached_transpose():
    gen = torch.Generator().manual_seed(1)
    A, dense = random_csr((50, 40), 0.2, torch.float32, True, gen)
    X = torch.randn(40, 8, generator=gen, requires_grad=True)
    G = torch.randn(50, 8, generator=gen)
    spmm(A, X).backward(G)
    At = A.transpose()
    torch.testing.assert_close(X.grad, dense.T @ G)
    X.grad = None
    spmm(A, X).backward(G)
    assert A.transpose() is At
    torch.testing.assert_close(X.grad, dense.T @ G)


@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (0, 4), (4, 0)])
def test_transpose(with_values, shape):
    gen = torch.Generator().manual_seed(2)
    A, dense = random_csr(shape, 0.3, torch.float32, with_values, gen)
    At = A.transpose()
    ref = CSR.from_dense(dense.T)
    assert At.shape == (shape[1], shape[0])
    assert torch.equal(At.indptr, ref.indptr)
    assert torch.equal(At.indices, ref.indices)
    if with_values:
        assert torch.equal(At.values, ref.values)
    else:
        assert At.values is None
    assert A.transpose() is At
    assert At.transpose() is A


@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize(("start", "stop"), [(0, 12), (12, 30), (5, 5), (0, 30)])
def test_column_block(with_values, start, stop):
    gen = torch.Generator().manual_seed(3)
    A, dense = random_csr((25, 30), 0.3, torch.float32, with_values, gen)
    B = A.column_block(start, stop)
    ref = CSR.from_dense(dense[:, start:stop])
    assert B.shape == (25, stop - start)
    assert torch.equal(B.indptr, ref.indptr)
    assert torch.equal(B.indices, ref.indices)
    if with_values:
        assert torch.equal(B.values, ref.values)


def test_inner_plus_halo_equals_whole():
    """``A_halo·X_halo + A_inner·X_inner`` through ``acc`` equals ``A·X``."""
    gen = torch.Generator().manual_seed(4)
    A, dense = random_csr((30, 45), 0.25, torch.float32, True, gen)
    X = torch.randn(45, 6, generator=gen)
    inner, halo = A.column_block(0, 30), A.column_block(30, 45)
    Y = spmm(halo, X[30:], spmm(inner, X[:30]))
    torch.testing.assert_close(Y, dense @ X)


def test_from_coo_keeps_duplicates_and_scale():
    row = torch.tensor([2, 0, 2, 2])
    col = torch.tensor([1, 0, 1, 3])
    A = CSR.from_coo(row, col, (3, 4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert A.indptr.tolist() == [0, 1, 1, 4]
    assert A.indices.tolist() == [0, 1, 1, 3]
    assert A.values.tolist() == [2.0, 1.0, 3.0, 4.0]
    r, c = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 10.0, 100.0, 1000.0])
    dense = torch.zeros(3, 4).index_put_((row, col), torch.tensor([1.0, 2.0, 3.0, 4.0]), True)
    counts = torch.zeros(3, 4).index_put_((row, col), torch.ones(4), True)
    X = torch.eye(4)
    torch.testing.assert_close(spmm(A, X), dense)
    torch.testing.assert_close(spmm(A.scale(r, c), X), r[:, None] * dense * c)
    torch.testing.assert_close(spmm(A.with_values(None).scale(row=r), X), r[:, None] * counts)


def test_plus_diagonal():
    gen = torch.Generator().manual_seed(3)
    A, dense = random_csr((30, 30), 0.2, torch.float64, True, gen)
    diagonal = torch.randn(30, generator=gen, dtype=torch.float64)
    B = A.plus_diagonal(diagonal)
    assert B.nnz == A.nnz + 30
    for r in range(30):  # every row's columns ascending, the diagonal among them
        columns = B.indices[B.indptr[r] : B.indptr[r + 1]]
        assert torch.all(columns[1:] >= columns[:-1]) and r in columns.tolist()
    X = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(spmm(B, X), (dense + torch.diag(diagonal)) @ X)
    with pytest.raises(ValueError, match="square"):
        A.column_block(0, 20).plus_diagonal(diagonal)


def test_to_moves_cached_transpose():
    A = CSR.from_dense(torch.eye(3))
    At = A.transpose()
    B = A.to("cpu")
    assert B.transpose().transpose() is B
    assert torch.equal(B.transpose().indices, At.indices)


def test_a_matrix_and_its_transpose_are_no_reference_cycle() -> None:
    """A matrix holds its cached transpose and the transpose refers back weakly, so a pair
    made each epoch is freed by reference counting alone; a transpose that outlives its
    matrix builds it again."""
    import gc
    import weakref

    dense = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    a = CSR.from_dense(dense)
    t = a.transpose()
    assert t.transpose() is a and a.transpose() is t
    gc.disable()
    try:
        probe = weakref.ref(a)
        del a
        assert probe() is None  # freed at once: no cycle held it
    finally:
        gc.enable()
    again = t.transpose()
    assert torch.equal(
        torch.sparse_csr_tensor(again.indptr, again.indices, again.values, (2, 3)).to_dense(), dense
    )
