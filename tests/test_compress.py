"""Compressed model files (``bns-pipe compress``): the codecs, the file's byte accounting,
round trips through ``bns-pipe eval`` and ``load_model``, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bns_pipe import compress
from bns_pipe.cli import main
from bns_pipe.compress.codecs import IntCodec, KMeansCodec, kmeans_1d, pack_bits, unpack_bits
from bns_pipe.errors import BnsPipeError, ConfigError
from bns_pipe.train.checkpoint import CheckpointError, read_model_file


def test_bits_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    for bits in (1, 3, 4, 7, 16):
        codes = torch.randint(0, 1 << bits, (101,), generator=gen)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(101 * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, 101), codes)


def test_kmeans_shares_k_centres_and_beats_uniform_levels() -> None:
    """Every decoded weight is one of the K centres; the centres are the means of their
    clusters (a Lloyd fixed point); the error is below K evenly spaced levels'."""
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    codec = KMeansCodec(k="16")
    decoded = codec.decode(codec.encode(w), tuple(w.shape))
    centres, index = kmeans_1d(w, 16)
    assert torch.unique(decoded).numel() <= 16
    assert set(torch.unique(decoded).tolist()) <= set(centres.float().tolist())
    for c in range(16):
        assert torch.isclose(w.flatten()[index == c].double().mean(), centres[c])
    levels = torch.linspace(float(w.min()), float(w.max()), 16)
    uniform = levels[(w.flatten()[:, None] - levels).abs().argmin(1)]
    assert (decoded - w).pow(2).mean() < 0.7 * (uniform - w.flatten()).pow(2).mean()
    few = torch.tensor([[0.5, -1.0], [0.5, 2.0]])  # fewer distinct values than k: exact
    assert torch.equal(codec.decode(codec.encode(few), (2, 2)), few)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_int_codec_is_within_half_a_step(bits: int) -> None:
    w = torch.randn(10, 30, generator=torch.Generator().manual_seed(bits))
    w[3] = 0.0  # a zero row decodes to zeros
    codec = IntCodec(bits=str(bits))
    fields = codec.encode(w)
    decoded = codec.decode(fields, (10, 30))
    step = fields["scale"][:, None]
    if bits > 1:
        assert ((decoded - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(decoded[3], torch.zeros(30))
    assert fields["codes"].numel() == math.ceil(300 * bits / 8)


def test_smartexchange_is_a_basis_times_powers_of_two() -> None:
    """Ce's entries are 0 or ±2^k within 2^E exponents of the largest, at the asked
    sparsity; B is basis x basis; the kept error is the smallest of the iterations and
    below the first; the file's fields decode to Ce·B; about 1 + (1 - s)(1 + E) bits a
    weight."""
    from bns_pipe.compress.smartexchange import SmartExchangeCodec, decompose

    w = torch.randn(40, 30, generator=torch.Generator().manual_seed(2)) * 0.1
    codec = SmartExchangeCodec(basis="3", sparsity="0.5", exp_bits="4", iterations="30")
    x, _ = codec.blocks(w)
    coefficients, basis, k_max, errors = decompose(x, 0.5, 4, 30)
    assert basis.shape == (3, 3) and coefficients.shape == x.shape
    nonzero = coefficients[coefficients != 0].abs()
    k = torch.log2(nonzero)
    assert torch.equal(k, k.round()) and k.max() == k_max and k.min() >= k_max - 15
    assert (coefficients == 0).double().mean() >= 0.5
    best = float(torch.linalg.norm(x - coefficients @ basis))
    assert best == pytest.approx(min(errors)) and min(errors) < errors[0]
    fields = codec.encode(w)
    assert tuple(fields["basis"].shape) == (3, 3)
    decoded = codec.decode(fields, (40, 30))
    expected = (coefficients @ fields["basis"].double()).flatten()[:1200].view(40, 30)
    torch.testing.assert_close(decoded, expected.float())
    stored = sum(t.numel() * t.element_size() for t in fields.values())
    assert stored <= 1200 * (1 + 0.5 * 5) / 8 + 36 + 2 + 3


@pytest.mark.parametrize(
    "spec, message",
    [
        ("smartexchange:sparsity=1", r"sparsity in \[0, 1\)"),
        ("smartexchange:exp_bits=9", r"exp_bits in \[1, 8\]"),
        ("kmeans:k=1", "k >= 2"),
        ("int:bits=0", r"bits in \[1, 16\]"),
        ("int:bits=17", r"bits in \[1, 16\]"),
        ("zip", "unknown compression method"),
        ("kmeans:centres=4", "unexpected keyword"),
    ],
)
def test_bad_methods_are_rejected(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compress.parse_method(spec)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-layer GCN trained 20 epochs on one rank of the synthetic gold graph (float64, so
    evaluations on 1 and 2 ranks agree exactly)."""
    from bns_pipe.partition import partition
    from tests.test_gold import gold_dataset

    tmp = tmp_path_factory.mktemp("compress")
    partition(gold_dataset("synthetic"), 1, tmp / "p", verbose=False)
    run = ["--partition-dir", str(tmp / "p"), "--epochs", "20", "--hidden", "32"]
    run += ["--dtype", "float64"]
    saving = ["--checkpoint-dir", str(tmp / "ckpt"), "--checkpoint-every", "20", "--no-progress"]
    assert main(["train", *run, *saving]) == 0
    return tmp


def _eval(capfd, checkpoint: Path, partition_dir: Path) -> dict:
    assert (
        main(["eval", "--checkpoint", str(checkpoint), "--partition-dir", str(partition_dir)]) == 0
    )
    return json.loads(capfd.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", ["kmeans:k=16", "int:bits=4"])
def test_compressed_file_round_trips(trained: Path, capfd, spec: str) -> None:
    """compress → the ratio equals the byte counts; the file holds no optimiser state and at
    most 4 KB of metadata; eval and load_model of the file give the decompressed model's
    logits on any world size (here 1 rank and a fresh model)."""
    from bns_pipe.api import load_model
    from tests.test_gold import gold_dataset

    checkpoint = next((trained / "ckpt").glob("epoch_*"))
    out = trained / f"{spec.replace(':', '-')}.pt"
    assert (
        main(["compress", "--checkpoint", str(checkpoint), "--method", spec, "--out", str(out)])
        == 0
    )
    summary = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    raw = torch.load(out, weights_only=True)
    assert compress.is_compressed(raw) and "optimizer" not in raw and raw["meta"].numel() <= 4096
    payload = {
        n: sum(t.numel() * t.element_size() for t in f.values()) for n, f in raw["payload"].items()
    }
    plain = read_model_file(checkpoint)["model"]
    for name, ratio in summary["layers"].items():
        assert ratio == pytest.approx(plain[name].numel() * 4 / payload[name])
    total = sum(plain[n].numel() * 4 for n in payload) / sum(payload.values())
    assert summary["ratio"] == pytest.approx(total) and summary["ratio"] > 6
    decoded = read_model_file(out)["model"]
    assert decoded.keys() == plain.keys()
    scores = _eval(capfd, out, trained / "p")
    assert scores["test"] > 0.5  # still a trained model
    if spec.startswith("kmeans"):  # any world size: 2 ranks score the same
        from bns_pipe.partition import partition

        if not (trained / "p2").exists():
            partition(gold_dataset("synthetic"), 2, trained / "p2", verbose=False)
        assert _eval(capfd, out, trained / "p2") == {**scores}
    data = gold_dataset("synthetic")
    model = load_model(out)
    reference = load_model(checkpoint)
    reference.load_state_dict(decoded)
    x = data.x.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x, data.edge_index), reference(x, data.edge_index))


def test_bad_files_are_refused(trained: Path, tmp_path: Path, capfd) -> None:
    """A file that is not a checkpoint, a corrupt one, and an already compressed one (a
    best model, without optimiser state, is not one)."""
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    with pytest.raises(CheckpointError, match="not a bns_pipe checkpoint"):
        read_model_file(bogus)
    (tmp_path / "text.pt").write_text("hello")
    once = tmp_path / "once.pt"
    for source, message in [(tmp_path / "text.pt", "corrupt or not a bns_pipe checkpoint")]:
        args = ["--checkpoint", str(source), "--method", "int:bits=8", "--out", str(once)]
        assert main(["compress", *args]) == 2
        err = capfd.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1  # torch's advice cut
        assert "False" not in err  # never the advice to load with weights_only=False
    checkpoint = next((trained / "ckpt").glob("epoch_*"))
    args = ["--method", "int:bits=8", "--out", str(once)]
    assert main(["compress", "--checkpoint", str(checkpoint), *args]) == 0
    best = trained / "ckpt" / "best"  # the best model (no optimiser state) compresses too
    best_args = ["--method", "int:bits=8", "--out", str(tmp_path / "best.pt")]
    assert main(["compress", "--checkpoint", str(best), *best_args]) == 0
    twice = ["--checkpoint", str(once), "--method", "int:bits=8", "--out", str(tmp_path / "x.pt")]
    assert main(["compress", *twice]) == 2
    assert "already compressed" in capfd.readouterr().err
    raw = torch.load(once, weights_only=True)
    raw["meta"] = raw["meta"][:10]  # truncated metadata
    torch.save(raw, tmp_path / "cut.pt")
    with pytest.raises(BnsPipeError, match="is corrupt"):
        read_model_file(tmp_path / "cut.pt")


def test_kmeans_hook_is_the_identity_until_it_shares_and_passes_gradients_straight() -> None:
    """Soft phase: the parametrized layer computes with W. Hard phase: with k at least the
    number of distinct weights the shared weights are W exactly; with fewer, every weight is
    one of k centres; the gradient reaches the latent W unchanged (straight through)."""
    from bns_pipe.hooks import EpochContext, build_hook
    from bns_pipe.hooks.weights import conv_weights, plain_state_dict
    from bns_pipe.nn.model import GNN

    torch.manual_seed(0)
    model = GNN(6, 8, 3, layers=2, conv="sage", norm="none", dropout=0.0)
    before = {name: m.weight.detach().clone() for name, m in conv_weights(model)}
    hook = build_hook("kmeans:k=4096,hard_at=0.5")
    hook.on_model(model)
    hook.on_epoch(EpochContext(0, True, epochs=4))  # soft
    for name, module in conv_weights(model):
        assert torch.equal(module.weight, before[name])
    assert not hook.deployed()  # model selection waits for the shared weights
    hook.on_epoch(EpochContext(0, False, epochs=4))  # an evaluation scores them shared
    assert hook.deployed()
    for name, module in conv_weights(model):  # (k > distinct values: exactly W)
        assert torch.equal(module.weight, before[name])
    hook.on_epoch(EpochContext(2, True, epochs=4))  # hard, k > distinct values: exact
    assert hook.deployed()
    for name, module in conv_weights(model):
        assert torch.equal(module.weight, before[name])
    small = build_hook("kmeans:k=4,hard_at=0")
    torch.manual_seed(0)
    model = GNN(6, 8, 3, layers=2, conv="sage", norm="none", dropout=0.0)
    small.on_model(model)
    soft = build_hook("kmeans:k=4,hard_at=0.75")
    soft_model = GNN(6, 8, 3, layers=2, conv="sage", norm="none", dropout=0.0)
    soft.on_model(soft_model)
    soft.on_epoch(EpochContext(0, True, epochs=4))
    soft.on_epoch(EpochContext(0, False, epochs=4))  # evaluation: 4 shared values
    assert all(torch.unique(m.weight).numel() <= 4 for _, m in conv_weights(soft_model))
    soft.on_epoch(EpochContext(1, True, epochs=4))  # training again: W itself
    for _, module in conv_weights(soft_model):
        assert torch.equal(module.weight, module.parametrizations.weight.original)
    small.on_epoch(EpochContext(0, True, epochs=4))
    for _, module in conv_weights(model):
        assert torch.unique(module.weight).numel() <= 4
        latent = module.parametrizations.weight.original
        grad = torch.randn_like(module.weight)
        (module.weight * grad).sum().backward()
        assert torch.equal(latent.grad, grad)
    plain, own = plain_state_dict(model)
    assert set(plain) == set(GNN(6, 8, 3, layers=2, conv="sage").state_dict()) and not own
    assert small.report()["clusters"] == [4, 4, 4, 4]  # lin_l and lin_r of both layers


def test_kmeans_regulariser_pulls_weights_to_their_centres() -> None:
    """loss_term = λ/2 Σ (w - c(w))², whose gradient is λ (w - c(w))."""
    from bns_pipe.hooks import EpochContext, build_hook
    from bns_pipe.hooks.weights import conv_weights
    from bns_pipe.nn.model import GNN

    model = GNN(5, 6, 2, layers=2, norm="none", dropout=0.0).double()
    hook = build_hook("kmeans:k=3,lam=0.5,hard_at=1")
    hook.on_model(model)
    hook.on_epoch(EpochContext(0, True, epochs=10))
    term = hook.loss_term()
    term.backward()
    for (_, module), (_, index) in zip(conv_weights(model), hook.assignments, strict=True):
        w = module.parametrizations.weight.original
        means = torch.stack([w.detach().flatten()[index == c].mean() for c in range(3)])
        expected = 0.5 * (w.detach().flatten() - means[index])
        torch.testing.assert_close(w.grad.flatten(), expected)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("kmeans:k=1", "k >= 2"),
        ("kmeans:hard_at=2", r"hard_at in \[0, 1\]"),
        ("kmeans:lam=x", "could not convert"),
    ],
)
def test_bad_kmeans_options(spec: str, message: str) -> None:
    from bns_pipe.train.config import TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig(hook=[spec]).validate()


def runs_on_one_and_two_ranks(tmp_path: Path, hook: str, **options) -> list[list[dict]]:
    """The metrics records of the same float64 run without dropout on 1 and on 2 ranks,
    whose losses must agree."""
    from bns_pipe.partition import partition
    from tests.test_gold import gold_dataset
    from tests.test_quant import fit_records

    data = gold_dataset("synthetic")
    runs = []
    for world in (1, 2):
        partition(data, world, tmp_path / f"p{world}", verbose=False)
        common = {"hidden": 16, "layers": 2, "dropout": 0.0, "dtype": "float64", **options}
        for key, value in options.items():  # per-world directories
            if key.endswith("_dir"):
                common[key] = f"{value}{world}"
        runs.append(
            fit_records(
                tmp_path,
                world=world,
                partition_dir=str(tmp_path / f"p{world}"),
                hook=[hook],
                **common,
            )
        )
    losses = [torch.tensor([r["loss"] for r in run if "epoch" in r]) for run in runs]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=0)
    return runs


def test_weight_hook_trains_alike_on_one_and_two_ranks(tmp_path: Path) -> None:
    """k-means sharing (soft, then hard from epoch 3): the same losses on 1 and 2 ranks;
    every evaluation scores shared weights, so model selection counts every epoch; the
    checkpoint keeps plain names and shared weights."""
    ckpt = str(tmp_path / "ckpt")
    runs = runs_on_one_and_two_ranks(
        tmp_path,
        "kmeans:k=8,lam=0.01,every=2,hard_at=0.5",
        epochs=6,
        checkpoint_dir=ckpt,
        checkpoint_every=6,
    )
    assert all(run[-1]["hooks"]["kmeans"]["clusters"] == [8, 8] for run in runs)
    for run in runs:  # soft-phase evaluations score the weights shared as of then
        assert run[-1]["best_val_acc"] == max(r["val_acc"] for r in run if "val_acc" in r)
    state = read_model_file(next((tmp_path / "ckpt2").glob("epoch_*")))["model"]
    assert "convs.0.lin.weight" in state and torch.unique(state["convs.0.lin.weight"]).numel() == 8


def test_ldp_is_the_identity_at_full_width_and_learns_its_widths() -> None:
    """At 32 bits the parametrized model equals the plain one; at a fractional width the
    weight gradient passes straight through, the width's gradient is the interpolation's
    (Σ g·(Q_⌈b⌉ - Q_⌊b⌋)), evaluation computes at ⌈b⌉, and the report has one width per
    conv layer (SAGE's two maps share it)."""
    from bns_pipe.hooks import EpochContext, build_hook
    from bns_pipe.hooks.ldp import fake_quantize
    from bns_pipe.hooks.weights import conv_weights, plain_state_dict
    from bns_pipe.nn.model import GNN

    torch.manual_seed(0)
    plain = GNN(6, 8, 3, layers=2, conv="sage", norm="none", dropout=0.0)
    hooked = GNN(6, 8, 3, layers=2, conv="sage", norm="none", dropout=0.0)
    hooked.load_state_dict(plain.state_dict())
    full = build_hook("ldp:min_bits=32,max_bits=32,init=32")
    full.on_model(hooked)
    for (_, a), (_, b) in zip(conv_weights(plain), conv_weights(hooked), strict=True):
        assert torch.equal(a.weight, b.weight)
    assert full.report()["bits_per_layer"] == [32, 32]
    w = torch.randn(5, 7, requires_grad=True)
    bits = torch.tensor(4.3, requires_grad=True)
    r = w.detach().abs().max()
    q = fake_quantize(w, r, bits)
    g = torch.randn(5, 7)
    (q * g).sum().backward()
    assert torch.equal(w.grad, g)
    low, high = (fake_quantize(w.detach(), r, torch.tensor(float(n))) for n in (4, 5))
    torch.testing.assert_close(bits.grad, (g * (high - low)).sum())
    torch.testing.assert_close(q, 0.7 * low + 0.3 * high)
    assert torch.equal(fake_quantize(w.detach(), r, bits.detach(), deployed=True), high)
    # a ReLU's output: [0, r] in 2^n levels (2^n - 1 steps), negatives to 0, twice as fine
    relu = torch.tensor([-1.0, 0.0, 0.35, 1.0, 2.0])
    q4 = fake_quantize(relu, torch.tensor(1.0), torch.tensor(4.0), unsigned=True)
    torch.testing.assert_close(q4, torch.tensor([0.0, 0.0, 5 / 15, 1.0, 1.0]))
    levels = fake_quantize(torch.rand(999), torch.tensor(1.0), torch.tensor(4.0), unsigned=True)
    assert len(torch.unique(levels)) == 16
    learned = build_hook("ldp:init=5.5")
    model = GNN(6, 8, 3, layers=3, conv="sage", norm="none", dropout=0.0)
    learned.on_model(model)
    learned.on_epoch(EpochContext(0, True, epochs=1))
    report = learned.report()
    assert report["bits_per_layer"] == [6, 6, 6] and report["bits_history"] == [[5.5] * 3]
    assert learned.loss_term() is not None
    with torch.no_grad():
        learned.layers[1][0].beta.fill_(3.2)  # SAGE: both maps of layer 1 deploy at 4 bits
    weights, own = plain_state_dict(model)
    saved = learned.saved_report({"model": weights, "hook_state": own})
    assert saved == {k: v for k, v in learned.report().items() if k != "bits_history"}
    assert saved["bits_per_layer"] == [6, 4, 6] and 4 < saved["avg_bits"] < 6


def test_ldp_input_range_follows_the_activation_on_its_own_scale() -> None:
    """A training forward sets the input range α to the largest activation before dropout's
    1 / (1 - p) (so nothing is clipped in training); evaluation keeps it: a ReLU output and
    its dropped-out training copy land on the same grid relative to the activation."""
    from bns_pipe.hooks.ldp import _input_hook, _Precision

    precision = _Precision(init=4, low=4, high=4)
    quantize = _input_hook(precision, unsigned=True, keep=0.25)  # dropout p = 0.75
    layer = torch.nn.Module()
    activation = torch.tensor([[0.0, 0.31, 1.5], [0.9, 0.12, 0.7]])
    _, trained, _ = quantize(layer.train(), ("graph", activation / 0.25, 0))
    assert float(precision.alpha) == 1.5 and float(trained.max()) == 6.0  # no clip
    _, evaluated, _ = quantize(layer.eval(), ("graph", activation, 0))
    assert float(precision.alpha) == 1.5  # evaluation keeps the range
    torch.testing.assert_close(evaluated, trained * 0.25)  # 15 steps of 0.1
    torch.testing.assert_close(evaluated, torch.tensor([[0.0, 0.3, 1.5], [0.9, 0.1, 0.7]]))


def test_ldp_trains_alike_on_one_and_two_ranks(tmp_path: Path) -> None:
    """Learned widths and input ranges are replicated: the same losses and widths on 1 and
    2 ranks; the widths move under the cost term."""
    runs = runs_on_one_and_two_ranks(
        tmp_path, "ldp:init=5.5,cost=1", epochs=5, checkpoint_dir=str(tmp_path / "ck")
    )
    reports = [run[-1]["hooks"]["ldp"] for run in runs]
    assert reports[0]["bits_history"] == reports[1]["bits_history"]
    assert reports[0]["bits_history"][-1][0] < 5.5 and len(reports[0]["bits_per_layer"]) == 2


def test_eval_of_an_ldp_checkpoint_quantizes_the_inputs_again(tmp_path: Path, capfd) -> None:
    """The checkpoint holds the quantized weights; ``eval`` runs the hook again with the
    saved ranges, so it scores what training's last evaluation scored (without the input
    quantization it would not: seen 42 % instead of 80 % on Amazon Computers)."""
    runs = runs_on_one_and_two_ranks(
        tmp_path, "ldp:init=3,min_bits=2,max_bits=3", epochs=4, checkpoint_dir=str(tmp_path / "ck")
    )
    last = [r for r in runs[0] if "val_acc" in r][-1]
    scores = _eval(capfd, next((tmp_path / "ck1").glob("epoch_*")), tmp_path / "p1")
    assert scores["val"] == last["val_acc"]
