"""DistBatchNorm over 1, 2 and 3 gloo ranks equals BatchNorm1d on the concatenated rows."""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bns_pipe.nn.norm import DistBatchNorm, make_norm

C = 5
STEPS = 2
CONFIGS = [{"momentum": 0.1, "affine": True}, {"momentum": None, "affine": False}]
JOIN_TIMEOUT_S = 90.0
TOL = {"rtol": 1e-10, "atol": 1e-12}


def step_data(total: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input rows (total, C) with nonzero means and unequal scales, and an upstream gradient."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(total, C, generator=gen, dtype=torch.float64) * torch.arange(1.0, C + 1) + 3
    return x, torch.randn(total, C, generator=gen, dtype=torch.float64)


def init_affine(module: nn.BatchNorm1d) -> None:
    if module.affine:
        with torch.no_grad():
            module.weight.copy_(torch.linspace(0.5, 2.0, C))
            module.bias.copy_(torch.linspace(-1.0, 1.0, C))


def run_steps(module: nn.BatchNorm1d, sizes: list[int], rank: int) -> dict[str, list]:
    """STEPS training steps on this rank's rows, then one eval forward; every result recorded."""
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out: dict[str, list] = {"y": [], "dx": [], "dw": [], "db": [], "eval": []}
    for step in range(STEPS):
        x_all, dy_all = step_data(sum(sizes), step)
        x = x_all[start:stop].clone().requires_grad_()
        y = module.train()(x)
        y.backward(dy_all[start:stop])
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        if module.affine:
            out["dw"].append(module.weight.grad.clone())
            out["db"].append(module.bias.grad.clone())
            module.zero_grad()
    out["eval"].append(module.eval()(step_data(sum(sizes), STEPS)[0][start:stop]).detach())
    out["buffers"] = [b.clone() for b in module.buffers()]
    return out


def worker(rank: int, world: int, port: int, sizes: list[int], out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        results = []
        for config in CONFIGS:
            module = DistBatchNorm(C, **config).double()
            init_affine(module)
            results.append(run_steps(module, sizes, rank))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(sizes: list[int], out_dir: Path) -> list:
    """Run ``worker`` on len(sizes) processes; fail (never hang) past JOIN_TIMEOUT_S."""
    world, port = len(sizes), free_port()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=worker, args=(r, world, port, sizes, str(out_dir))) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    assert not hung, f"{len(hung)} of {world} ranks did not finish in {JOIN_TIMEOUT_S} s"
    assert [proc.exitcode for proc in procs] == [0] * world
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("sizes", [[1, 12], [7, 1, 10]], ids=["world2", "world3"])
def test_dist_batch_norm_matches_batch_norm(tmp_path, sizes):
    ranks = spawn(sizes, tmp_path)
    for c, config in enumerate(CONFIGS):
        reference = nn.BatchNorm1d(C, **config).double()
        init_affine(reference)
        ref = run_steps(reference, [sum(sizes)], 0)
        got = [r[c] for r in ranks]
        for name in ("y", "dx", "eval"):
            for step, expected in enumerate(ref[name]):
                rows = torch.cat([g[name][step] for g in got])
                torch.testing.assert_close(rows, expected, **TOL)
        for name in ("dw", "db"):  # summed over ranks, as gradient all-reduce does
            for step, expected in enumerate(ref[name]):
                torch.testing.assert_close(sum(g[name][step] for g in got), expected, **TOL)
        for g in got:
            for buffer, expected in zip(g["buffers"], ref["buffers"], strict=True):
                torch.testing.assert_close(buffer, expected, **TOL)


@pytest.mark.parametrize("config", CONFIGS)
def test_single_process_is_batch_norm(config):
    assert not dist.is_initialized()
    module = DistBatchNorm(C, **config).double()
    reference = nn.BatchNorm1d(C, **config).double()
    init_affine(module)
    init_affine(reference)
    got, ref = run_steps(module, [9], 0), run_steps(reference, [9], 0)
    for name, values in ref.items():
        for a, b in zip(got[name], values, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_interchanges_with_batch_norm():
    reference = nn.BatchNorm1d(C)
    run_steps(reference.double(), [6], 0)
    module = DistBatchNorm(C).double()
    module.load_state_dict(reference.state_dict())
    assert list(module.state_dict()) == list(reference.state_dict())
    x = torch.randn(4, C, dtype=torch.float64)
    torch.testing.assert_close(module.eval()(x), reference.eval()(x), rtol=0, atol=0)


def test_make_norm():
    assert isinstance(make_norm("none", 8), nn.Identity)
    layer = make_norm("layer", 8)
    assert isinstance(layer, nn.LayerNorm) and layer.normalized_shape == (8,)
    batch = make_norm("batch", 8)
    assert isinstance(batch, DistBatchNorm) and batch.num_features == 8
    with pytest.raises(ValueError, match=r"none.*layer.*batch"):
        make_norm("group", 8)
