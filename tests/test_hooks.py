"""The layer-hook interface: every point is called where the interface says, messages carry
the right global ids, a weight parametrization and a replacement inner operator keep training
exact, per-epoch times and reports reach the metrics, and bad specs fail early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from bns_pipe.errors import ConfigError
from bns_pipe.graph import CsrOperator
from bns_pipe.hooks import HOOKS, EpochContext, LayerHook, Message, build_hook
from bns_pipe.train.config import TrainConfig
from tests.distributed import run_ranks
from tests.test_gold import check_against_reference, gold_dataset, run_cases, run_world


class Probe(LayerHook):
    """Records every call; ``report`` and ``epoch_times`` return fixed values."""

    name = "probe"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.contexts: list[EpochContext] = []
        self.messages: list[tuple[str, Message, torch.Tensor]] = []

    def on_graph(self, part):
        self.calls.append("graph")
        return part

    def on_model(self, model: nn.Module) -> None:
        self.calls.append("model")

    def on_epoch(self, context: EpochContext) -> None:
        self.contexts.append(context)

    def on_send(self, message: Message, rows: torch.Tensor) -> torch.Tensor:
        self.messages.append(("send", message, rows.clone()))
        return rows

    def on_receive(self, message: Message, payload: torch.Tensor) -> torch.Tensor:
        self.messages.append(("receive", message, payload.clone()))
        return payload

    def epoch_times(self) -> dict[str, float]:
        return {"probe_s": 0.25}

    def report(self) -> dict:
        return {"epochs_seen": sum(c.training for c in self.contexts)}


class Doubled(nn.Module):
    """A parametrization: the stored weight is half the weight the layer uses."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / 2


class HalfWeights(LayerHook):
    """Weight point: every conv weight through :class:`Doubled` (the used weights stay)."""

    name = "half-weights"

    def on_model(self, model: nn.Module) -> None:
        for conv in model.convs:
            parametrize.register_parametrization(conv.lin, "weight", Doubled())


class DenseInner(LayerHook):
    """Inner-aggregation point: the inner block as a dense matrix."""

    name = "dense-inner"

    def inner_operator(self, kind, default):
        block = default.block  # GCN's with its self-loop term as the diagonal
        dense = torch.zeros(block.shape, dtype=block.values.dtype)
        dense[block.row_ids(), block.indices] = block.values
        return DenseOperator(dense, default.self_loops)


class DenseOperator:
    def __init__(self, dense: torch.Tensor, self_loops: bool) -> None:
        self.dense, self.self_loops = dense, self_loops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense.to(x.dtype) @ x

    def transposed(self, g: torch.Tensor) -> torch.Tensor:
        return self.dense.to(g.dtype).t() @ g


for _hook in (Probe, HalfWeights, DenseInner):
    HOOKS[_hook.name] = _hook  # registered on import, in the spawned ranks too


def run_cases_here(rank: int, world: int, cases) -> None:
    """:func:`tests.test_gold.run_cases` in ranks that import this module (its hooks)."""
    run_cases(rank, world, cases)


def _probe_worker(rank: int, world: int, config: TrainConfig, out: Path) -> None:
    from bns_pipe.train.distributed import init_distributed, shutdown
    from bns_pipe.train.trainer import Trainer

    ctx = init_distributed("gloo", "cpu", 1, 60)
    trainer = Trainer(config, ctx)
    final = trainer.fit()
    (probe,) = trainer.hooks
    messages = [
        {
            "kind": kind,
            "layer": m.layer,
            "direction": m.direction,
            "ids": m.global_ids,
            "rows": rows,
        }
        for kind, m, rows in probe.messages
    ]
    contexts = [(c.epoch, c.training) for c in probe.contexts]
    torch.save(
        {"calls": probe.calls, "contexts": contexts, "messages": messages}, out / f"{rank}.pt"
    )
    if rank == 0:
        (out / "final.json").write_text(json.dumps(final))
    shutdown()


def test_every_point_is_called_and_messages_name_their_rows(tmp_path: Path) -> None:
    from bns_pipe.partition import partition

    partition(gold_dataset("synthetic"), 2, tmp_path / "p", verbose=False)
    metrics = tmp_path / "m.jsonl"
    config = TrainConfig(
        partition_dir=str(tmp_path / "p"),
        epochs=2,
        hidden=8,
        dtype="float64",
        hook=["probe"],
        metrics_jsonl=str(metrics),
        progress=False,
    )
    run_ranks(_probe_worker, 2, config, tmp_path, timeout=120)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        assert r["calls"] == ["graph", "model"]
        # train epoch 0, evaluate, train epoch 1, evaluate
        assert r["contexts"] == [(0, True), (0, False), (1, True), (1, False)]
    # a row received with global id g is the row its owner sent for g (same layer, direction,
    # in the same order of transfers)
    sent = {}
    for r in ranks:
        for m in (m for m in r["messages"] if m["kind"] == "send"):
            for gid, row in zip(m["ids"].tolist(), m["rows"], strict=True):
                sent.setdefault((m["layer"], m["direction"], gid), []).append(row)
    checked = 0
    for r in ranks:
        seen: dict = {}
        for m in (m for m in r["messages"] if m["kind"] == "receive"):
            for gid, row in zip(m["ids"].tolist(), m["rows"], strict=True):
                key = (m["layer"], m["direction"], gid)
                if m["direction"] == "forward":  # each feature row travels once per transfer
                    k = seen[key] = seen.get(key, -1) + 1
                    torch.testing.assert_close(row, sent[key][k])
                    checked += 1
    assert checked > 0
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert all(r["probe_s"] == 0.25 for r in records if "epoch" in r)
    assert records[-1]["hooks"] == {"probe": {"epochs_seen": 2}}


def test_replacement_inner_operator_keeps_training_exact(tmp_path: Path) -> None:
    """An inner operator equal to A_inner changes nothing: the gold comparison holds."""
    options = {"model": "gcn", "hook": ["dense-inner"]}
    results = run_world(2, [("synthetic", options)], tmp_path, run_cases_here)["synthetic/0"]
    check_against_reference(gold_dataset("synthetic"), results, **options)


def test_weight_parametrization_is_replicated_exactly(tmp_path: Path) -> None:
    """The first step's logits are the reference's (the used weights are unchanged), the
    stored weights' gradients twice the reference's (chain rule), and 1 and 2 ranks train
    alike: every rank applies the same parametrization, the all-reduce stays exact."""
    from tests.test_gold import BASE, initial_state, reference_run

    data = gold_dataset("synthetic")
    options = {"model": "gcn", "hook": ["half-weights"]}
    one = run_world(1, [("synthetic", options)], tmp_path / "one", run_cases_here)
    two = run_world(2, [("synthetic", options)], tmp_path / "two", run_cases_here)
    one, two = one["synthetic/0"], two["synthetic/0"]
    torch.testing.assert_close(two[0]["losses"], one[0]["losses"], rtol=1e-9, atol=1e-10)
    layers, hidden, seed = BASE["layers"], BASE["hidden"], BASE["seed"]
    init = initial_state(data, "gcn", layers, hidden, seed)
    logits, grads, losses, _ = reference_run(data, "gcn", layers, hidden, init, BASE["lr"])
    for r in two:
        torch.testing.assert_close(r["logits"], logits[r["ids"]], rtol=1e-9, atol=1e-10)
        for name, grad in grads.items():
            stored = name.replace("lin.weight", "lin.parametrizations.weight.original")
            factor = 2.0 if stored != name else 1.0
            torch.testing.assert_close(r["grads"][stored], factor * grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(two[0]["losses"][0], losses[0], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(two[0]["losses"][1:], losses[1:])  # Adam sees other gradients


def test_default_inner_operator_is_the_block() -> None:
    from bns_pipe.sparse import CSR

    block = CSR.from_dense(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    op = CsrOperator(block)
    x = torch.tensor([[1.0], [3.0]])
    assert op(x).tolist() == [[6.0], [1.0]] and op.transposed(x).tolist() == [[3.0], [2.0]]


@pytest.mark.parametrize(
    "specs, message",
    [
        (["nope"], "unknown hook 'nope'"),
        (["probe:x"], "key=value"),
        (["probe:colour=red"], "bad options for hook 'probe'"),
        (["probe", "probe"], "more than once"),
    ],
)
def test_bad_specs_fail_at_validation(specs: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(hook=specs).validate()
    assert isinstance(build_hook("probe"), Probe)
