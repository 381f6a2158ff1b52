"""Weights trained in a codec's form (``--hook smartexchange``, ``--hook int``), fine-tuning
from a checkpoint (``--init-from``, ``bns-pipe compress --finetune-epochs``) and the exact
compression of what such a hook trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bns_pipe import compress
from bns_pipe.cli import main
from bns_pipe.errors import ConfigError
from bns_pipe.hooks import EpochContext, build_hook
from bns_pipe.hooks.weights import conv_weights, plain_state_dict
from bns_pipe.nn.model import GNN
from bns_pipe.train.checkpoint import read_model_file
from tests.test_compress import runs_on_one_and_two_ranks


def _hooked(spec: str, conv: str = "gcn"):
    torch.manual_seed(0)
    model = GNN(30, 24, 3, layers=2, conv=conv, norm="none", dropout=0.0)
    hook = build_hook(spec)
    hook.on_model(model)
    return model, hook


def _straight_through(model) -> None:
    """The gradient of the computed weight reaches the latent weight unchanged."""
    for _, module in conv_weights(model):
        latent = module.parametrizations.weight.original
        grad = torch.randn_like(module.weight)
        (module.weight * grad).sum().backward()
        assert torch.equal(latent.grad, grad)


def test_smartexchange_hook_computes_with_a_basis_times_powers_of_two() -> None:
    """Before the first step the layers compute with W; after a refresh with Ce·B: the
    decoded fields, Ce's nonzeros ±2^k at the asked sparsity, the basis kept for the next
    refresh; the gradient passes straight through; the report's ratio is the fields' bytes."""
    model, hook = _hooked("smartexchange:basis=3,sparsity=0.5,iterations=10,refresh=2")
    before = {name: m.weight.detach().clone() for name, m in conv_weights(model)}
    for name, module in conv_weights(model):
        assert torch.equal(module.weight, before[name])
    hook.on_epoch(EpochContext(0, True, epochs=4))
    for (name, module), fields in zip(conv_weights(model), hook.fields, strict=True):
        shape = tuple(module.weight.shape)
        assert torch.equal(module.weight, hook.codec.decode(fields, shape))
        assert not torch.equal(module.weight, before[name])
        basis = module.parametrizations.weight[0].basis
        assert torch.equal(basis, fields["basis"].double())
        x, tail = hook.codec.blocks(module.weight)
        coefficients = x @ torch.linalg.pinv(basis)
        noise = 1e-5 * coefficients.abs().max()  # W is Ce·B rounded to float32
        coefficients = torch.where(coefficients.abs() > noise, coefficients, 0.0)
        nonzero = coefficients[coefficients != 0].abs()
        torch.testing.assert_close(
            torch.log2(nonzero), torch.log2(nonzero).round(), atol=1e-4, rtol=0
        )
        assert (coefficients == 0).double().mean() >= 0.5 and tail.numel() == 720 % 3
    report = hook.report()
    assert 0.5 <= report["sparsity"] < 0.6
    dense = sum(4 * m.weight.numel() for _, m in conv_weights(model))
    stored = sum(t.numel() * t.element_size() for f in hook.fields for t in f.values())
    assert report["ratio"] == pytest.approx(dense / stored) and report["ratio"] > 6
    _straight_through(model)
    plain, own = plain_state_dict(model)
    assert "convs.0.lin.weight" in plain and "convs.0.lin.parametrizations.weight.0.basis" in own


def test_int_hook_computes_with_integers_per_row() -> None:
    """Each row of a computed weight is integers in [-(2^(B-1) - 1), 2^(B-1) - 1] times the
    row's scale max|W_row| / (2^(B-1) - 1), within half a step of W; one width a conv (SAGE's
    two maps share it); gradients straight through."""
    model, hook = _hooked("int:bits=4", conv="sage")
    latent = {
        n: m.parametrizations.weight.original.detach().clone() for n, m in conv_weights(model)
    }
    hook.on_epoch(EpochContext(0, True, epochs=2))
    for name, module in conv_weights(model):
        scale = latent[name].abs().amax(1, keepdim=True) / 7
        q = module.weight.detach() / scale
        torch.testing.assert_close(q, q.round(), atol=1e-5, rtol=0)
        assert q.abs().max() <= 7 + 1e-5
        assert ((module.weight - latent[name]).abs() <= scale / 2 + 1e-6).all()
    assert hook.report()["bits_per_layer"] == [4, 4]
    _straight_through(model)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("smartexchange:refresh=0", "refresh must be at least 1"),
        ("smartexchange:sparsity=1.5", r"sparsity in \[0, 1\)"),
        ("int:bits=0", r"bits in \[1, 16\]"),
        ("int:every=0", "every must be at least 1"),
        ("int:width=4", "unexpected keyword"),
    ],
)
def test_bad_options_fail_before_training(spec: str, message: str) -> None:
    from bns_pipe.train.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(hook=[spec]).validate()


def test_smartexchange_trains_alike_on_one_and_two_ranks_and_compresses_exactly(
    tmp_path: Path,
) -> None:
    """The same losses on 1 and 2 ranks (float64); the checkpoint holds Ce·B under plain
    names (and W's tail), which ``compress --method smartexchange`` stores to float
    rounding, started from the basis the hook kept."""
    runs_on_one_and_two_ranks(
        tmp_path, "smartexchange:iterations=8", epochs=4, checkpoint_dir=str(tmp_path / "ck")
    )
    blob = read_model_file(next((tmp_path / "ck2").glob("epoch_*")))
    spec = "smartexchange:iterations=8"
    content, _ = compress.compress_state(blob["model"], blob["config"], spec, blob["hook_state"])
    codec = compress.parse_method(spec)
    for name, fields in content["payload"].items():
        weight = blob["model"][name]
        assert weight.numel() % 3  # 32 x 16 and 16 x 5: a tail
        decoded = codec.decode(fields, tuple(weight.shape)).double()
        torch.testing.assert_close(decoded, weight, rtol=0, atol=1e-6)


def test_compressing_what_smartexchange_trained_needs_its_basis() -> None:
    """A weight Ce·B (as the hook leaves it: Ce sparse powers of two, B the basis it moved
    to) decomposes back from B to float rounding; from the identity, 40 alternations miss
    it by more than 5 % (seen 37 % on a layer trained 60 epochs on Cora)."""
    from bns_pipe.compress.smartexchange import power_of_two

    gen = torch.Generator().manual_seed(0)
    basis = (0.1 * torch.randn(3, 3, generator=gen, dtype=torch.float64)).float().double()
    coefficients = torch.randn(6400, 3, generator=gen, dtype=torch.float64)
    coefficients = torch.where(torch.rand(6400, 3, generator=gen) < 0.5, 0.0, coefficients)
    coefficients, _ = power_of_two(coefficients, 4)
    weight = (coefficients @ basis).float().view(64, 300)
    codec = compress.parse_method("smartexchange")
    hook_state = {"convs.0.lin.parametrizations.weight.0.basis": basis}
    hinted = codec.decode(codec.encode(weight, **codec.hint(hook_state, "convs.0.lin")), (64, 300))
    blind = codec.decode(codec.encode(weight), (64, 300))
    assert (hinted - weight).norm() <= 1e-6 * weight.norm()
    assert (blind - weight).norm() > 0.05 * weight.norm()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-layer GCN trained 15 epochs on 2 parts of the synthetic gold graph."""
    from bns_pipe.partition import partition
    from tests.test_gold import gold_dataset

    tmp = tmp_path_factory.mktemp("finetune")
    partition(gold_dataset("synthetic"), 2, tmp / "p", verbose=False)
    run = ["--partition-dir", str(tmp / "p"), "--epochs", "15", "--hidden", "16", "--no-progress"]
    run += ["--checkpoint-dir", str(tmp / "ck"), "--metrics-jsonl", str(tmp / "m.jsonl")]
    assert main(["train", *run]) == 0
    return tmp


def _losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"epoch"' in line]


def test_finetune_then_compress(checkpoint: Path, capfd) -> None:
    """``compress --finetune-epochs 3`` trains on 2 ranks from the checkpoint (its first loss
    is near the trained model's last, far from a fresh model's first) with every weight one
    of k centres, and writes a file whose model is the fine-tuned one."""
    ckpt = next((checkpoint / "ck").glob("epoch_*"))
    out, metrics = checkpoint / "tuned.pt", checkpoint / "tuned.jsonl"
    args = ["--checkpoint", str(ckpt), "--method", "kmeans:k=4", "--out", str(out)]
    tune = ["--finetune-epochs", "3", "--partition-dir", str(checkpoint / "p")]
    assert main(["compress", *args, *tune, "--metrics-jsonl", str(metrics)]) == 0
    summary = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert summary["finetune_epochs"] == 3 and summary["ratio"] > 10
    tuned, trained = _losses(metrics), _losses(checkpoint / "m.jsonl")
    assert len(tuned) == 3 and abs(tuned[0] - trained[-1]) < 0.1 < trained[0] - tuned[0] - 0.2
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert final["hooks"]["kmeans"]["clusters"] == [4, 4]
    model = read_model_file(out)["model"]
    assert all(torch.unique(model[f"convs.{i}.lin.weight"]).numel() <= 4 for i in range(2))
    assert not list(checkpoint.glob(".finetune-*"))  # its checkpoints are gone


def test_finetune_and_init_from_refuse_bad_input(checkpoint: Path, capfd) -> None:
    """Fine-tuning without a partition, a negative epoch count, and a checkpoint that does
    not fit the run's model: one clear line each."""
    ckpt = next((checkpoint / "ck").glob("epoch_*"))
    args = ["--checkpoint", str(ckpt), "--method", "int:bits=4", "--out", str(checkpoint / "x.pt")]
    assert main(["compress", *args, "--finetune-epochs", "2"]) == 2
    assert "needs --partition-dir" in capfd.readouterr().err
    assert main(["compress", *args, "--finetune-epochs", "-1"]) == 2
    assert "non-negative" in capfd.readouterr().err
    run = ["--partition-dir", str(checkpoint / "p"), "--epochs", "1", "--hidden", "8"]
    assert main(["train", *run, "--init-from", str(ckpt), "--no-progress"]) != 0
    assert "does not fit this run's model" in capfd.readouterr().err
