"""Halo exchange on 3 gloo ranks with uneven and empty send lists, both directions."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.distributed import run_ranks

WORLD = 3
N_INNER = (5, 0, 7)  # rank 1 owns nothing: its send lists are empty


def send_lists(owner: int) -> list[torch.Tensor]:
    """What ``owner`` sends to each peer: uneven subsets of its rows, some empty (shared rule)."""
    lists = []
    for receiver in range(WORLD):
        gen = torch.Generator().manual_seed(100 * owner + receiver)
        n = (
            0
            if receiver == owner
            else int(torch.randint(0, N_INNER[owner] + 1, (1,), generator=gen))
        )
        lists.append(torch.randperm(N_INNER[owner], generator=gen)[:n])
    return lists


def rows(rank: int, width: int = 3) -> torch.Tensor:
    """Rank ``rank``'s inner rows: row r is (rank, r, r*rank) + column offsets."""
    r = torch.arange(N_INNER[rank], dtype=torch.float64).unsqueeze(1)
    return 1000 * rank + 10 * r + torch.arange(width, dtype=torch.float64)


def _exchange_worker(rank: int, world: int, out: Path) -> None:
    from bns_pipe.comm.halo import HaloExchange
    from bns_pipe.hooks import ByteCounter
    from bns_pipe.train.distributed import init_distributed, shutdown

    ctx = init_distributed("gloo", "cpu", 1, 60)
    halo_counts = torch.tensor([len(send_lists(j)[rank]) for j in range(world)])
    counter = ByteCounter()
    exchange = HaloExchange(send_lists(rank), halo_counts, ctx.halo_group, [counter])
    halo = exchange.wait(exchange.start_forward(rows(rank), layer=0))
    gen = torch.Generator().manual_seed(rank)
    grad_halo = torch.randn(int(halo_counts.sum()), 3, generator=gen, dtype=torch.float64)
    returned = exchange.wait(exchange.start_backward(grad_halo, layer=0))
    grad_inner = torch.zeros(N_INNER[rank], 3, dtype=torch.float64)
    grad_inner.index_add_(0, exchange.plan.send_index, returned)
    torch.save(
        {"halo": halo, "grad_halo": grad_halo, "grad_inner": grad_inner, "bytes": counter.sent},
        out / f"rank_{rank}.pt",
    )
    shutdown()


def test_halo_rows_and_gradients_reach_the_right_ranks(tmp_path: Path) -> None:
    run_ranks(_exchange_worker, WORLD, tmp_path)
    res = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(WORLD)]
    expected_grad = [torch.zeros(N_INNER[r], 3, dtype=torch.float64) for r in range(WORLD)]
    for receiver in range(WORLD):
        # The halo block is each owner's send-list rows, grouped by owner in rank order.
        groups = [rows(owner)[send_lists(owner)[receiver]] for owner in range(WORLD)]
        assert torch.equal(res[receiver]["halo"], torch.cat(groups))
        # Each owner gets back exactly the gradient rows of its group, added into its rows.
        grads = res[receiver]["grad_halo"].split([g.size(0) for g in groups])
        for owner in range(WORLD):
            expected_grad[owner].index_add_(0, send_lists(owner)[receiver], grads[owner])
    for rank in range(WORLD):
        torch.testing.assert_close(res[rank]["grad_inner"], expected_grad[rank])
        sent_rows = sum(len(ids) for ids in send_lists(rank))
        assert res[rank]["bytes"]["forward"] == sent_rows * 3 * 8
        received_rows = res[rank]["halo"].size(0)
        assert res[rank]["bytes"]["backward"] == received_rows * 3 * 8
    assert sum(res[r]["halo"].size(0) for r in range(WORLD)) > 0
