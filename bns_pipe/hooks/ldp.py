"""Learnable dynamic precision: ``--hook ldp[:min_bits=2,max_bits=8,cost=0.05,init=6]``.

Every conv layer l learns a real bit width β_l, used as b_l = clamp(β_l, min_bits, max_bits),
and computes with its weights and its (dense) input fake-quantized at b_l bits (after Yu et
al., 2022: precisions learned with the task and moving over training, under a cost term).

- A tensor t with range r is quantized symmetrically at an integer width n:
  Q_n(t) = s·round(clamp(t, -r, r)/s), s = r / (2^(n-1) - 1); an input known to be
  nonnegative (after a ReLU: every layer's but the first, GAT's ELU aside) uses all 2^n
  levels on [0, r] instead: s = r / (2^n - 1), twice the resolution at the same width.
- The ranges follow the data and are the same on every rank: weights r = max|W| (replicated);
  inputs r = α_l, the largest |x| of the latest training forward over every rank's rows (an
  all-reduce of one scalar per layer), kept for evaluation. α_l is on the activation's own
  scale: dropout's 1 / (1 - p) is divided out in training, so training and evaluation see the
  same grid. Nothing is clipped in training: a learned (PACT) clip that starts below the
  activations as they grow costs Cora 0.3 points at 16 bits, where this costs none.
- In training a fractional width interpolates: Q_b = (1 - f)·Q_⌊b⌋ + f·Q_⌈b⌉, f = b - ⌊b⌋,
  so the loss has a gradient in b (Q_⌈b⌉ - Q_⌊b⌋ times the upstream gradient); t's gradient
  passes straight through inside the range and is 0 outside it. In
  evaluation (and in checkpoints) the layer computes at the deployed width ⌈b⌉.
- The loss gains ``cost`` · Σ_l b_l·n_l / Σ_l n_l (n_l: layer l's weights), the average weight
  bits, which pulls the widths down where the task allows.

β is a parameter and α a buffer of the parametrization modules, so both are replicated and
checkpointed like the weights; ``bns-pipe eval`` of a checkpoint runs the hook again
(inputs quantized with the saved ranges; ``load_model`` and compressed files hold the
quantized weights only). The final report gives ``bits_per_layer`` (one weight
width per conv layer, rounded up as deployed), their weighted mean, the ratio 32 / mean, and
the widths per epoch (``bits_history``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bns_pipe.hooks.base import EpochContext, LayerHook
from bns_pipe.hooks.weights import conv_weights

__all__ = ["LDPHook", "fake_quantize"]

EXACT = 24


def deployed_width(bits: float) -> int:
    """The integer width a learned width b deploys at: ⌈b⌉."""
    return math.ceil(bits - 1e-9)


def _quantize_at(t: Tensor, r: Tensor, n: int, unsigned: bool) -> Tensor:
    step = r / ((1 << (n if unsigned else n - 1)) - 1)
    return torch.round(t / step) * step


def fake_quantize(
    t: Tensor, r: Tensor, bits: Tensor, deployed: bool = False, unsigned: bool = False
) -> Tensor:
    """Q_b(t) with the range ``r`` (a scalar tensor, held fixed) and a fractional width
    ``bits`` >= 2 (``deployed``: Q_⌈b⌉; ``unsigned``: t clamped to [0, r], 2^n levels);
    gradients: straight through for t inside the range, 0 outside, the interpolation's for
    ``bits``. From ``EXACT`` bits on (a float32's significand) t passes unchanged."""
    if float(bits.detach()) >= EXACT:
        return t
    r = r.detach()
    clipped = t.clamp(torch.zeros_like(r) if unsigned else -r, r)
    if deployed:
        width = deployed_width(float(bits.detach()))
        levels = _quantize_at(clipped.detach(), r, width, unsigned)
        return clipped + (levels - clipped).detach()
    low = int(torch.floor(bits.detach()))
    f = bits - low
    lower = _quantize_at(clipped.detach(), r, low, unsigned)
    upper = _quantize_at(clipped.detach(), r, low + 1, unsigned) if f.detach() > 0 else lower
    value = (1 - f) * lower + f * upper
    return clipped + (value - clipped).detach() + (f - f.detach()) * (upper - lower)


class _Precision(nn.Module):
    """One conv layer's learned width β (shared by its weight matrices) and input range α."""

    def __init__(self, init: float, low: float, high: float) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(init)))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.low, self.high = low, high

    def bits(self) -> Tensor:
        return self.beta.clamp(self.low, self.high)

    @torch.no_grad()
    def observe(self, x: Tensor, scale: float) -> None:
        """α ← scale · max|x| over the rows of every rank (the same on each)."""
        peak = x.new_zeros(())
        if x.numel():
            low, high = torch.aminmax(x)
            peak = torch.maximum(high, -low) * scale
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        self.alpha.copy_(peak.clamp(min=1e-6))


class _QuantizedWeight(nn.Module):
    def __init__(self, precision: _Precision) -> None:
        super().__init__()
        self.precision = precision

    def forward(self, weight: Tensor) -> Tensor:
        r = weight.detach().abs().max().clamp(min=1e-12)
        bits = self.precision.bits().to(weight.dtype)
        return fake_quantize(weight, r, bits, deployed=not self.training)


def _input_hook(precision: _Precision, unsigned: bool, keep: float):
    """A forward pre-hook of a conv layer: its dense input fake-quantized at the layer's
    width (``unsigned``: the input is a ReLU's output). A training forward first sets the
    range α from this input; its input is dropout's, scaled by 1 / ``keep`` (1 - p), so the
    range there is α / keep: the same grid relative to the activation as in evaluation."""

    def quantize_input(module: nn.Module, args: tuple) -> tuple:
        graph, x, *rest = args
        if not isinstance(x, Tensor):  # sparse input features stay exact
            return args
        scale = keep if module.training else 1.0
        if module.training:
            precision.observe(x.detach(), scale)
        bits = precision.bits().to(x.dtype)
        r = precision.alpha.to(x.dtype) / scale
        q = fake_quantize(x, r, bits, deployed=not module.training, unsigned=unsigned)
        return (graph, q, *rest)

    return quantize_input


class LDPHook(LayerHook):
    name = "ldp"
    at_inference = True  # the layer inputs are quantized with the learned clips

    def __init__(
        self, min_bits: str = "2", max_bits: str = "8", cost: str = "0.05", init: str = "6"
    ) -> None:
        self.low, self.high = float(min_bits), float(max_bits)
        self.cost, self.init = float(cost), float(init)
        if not 2 <= self.low <= self.high <= 32:
            raise ValueError("ldp needs 2 <= min_bits <= max_bits <= 32")
        if self.cost < 0 or not self.low <= self.init <= self.high:
            raise ValueError("ldp needs cost >= 0 and init within [min_bits, max_bits]")
        self.layers: list[tuple[_Precision, int]] = []  # per conv layer: precision, weights
        self.history: list[list[float]] = []

    def on_model(self, model: nn.Module) -> None:
        precisions: dict[str, _Precision] = {}
        sizes: dict[str, int] = {}
        for name, module in conv_weights(model):
            conv = name.rsplit(".", 1)[0]  # convs.<i>: SAGE's two maps share one width
            if conv not in precisions:
                precision = _Precision(self.init, self.low, self.high)
                precisions[conv] = precision.to(module.weight.device, module.weight.dtype)
                after_relu = conv != "convs.0" and not getattr(model, "attention", False)
                keep = 1.0 - float(getattr(model, "dropout", 0.0))
                hook = _input_hook(precision, unsigned=after_relu, keep=keep)
                model.get_submodule(conv).register_forward_pre_hook(hook)
            precision = precisions[conv]
            parametrize.register_parametrization(module, "weight", _QuantizedWeight(precision))
            sizes[conv] = sizes.get(conv, 0) + module.weight.numel()
        self.layers = [(precisions[c], sizes[c]) for c in precisions]

    def on_epoch(self, context: EpochContext) -> None:
        if context.training:
            self.history.append(self._widths())

    def _widths(self) -> list[float]:
        return [float(p.bits().detach()) for p, _ in self.layers]

    def loss_term(self) -> Tensor | None:
        if self.cost == 0 or not self.layers:
            return None
        total = sum(n for _, n in self.layers)
        return self.cost * sum(p.bits() * n for p, n in self.layers) / total

    def report(self) -> dict:
        summary = _deployed(self._widths(), [n for _, n in self.layers])
        return {**summary, "bits_history": self.history}

    def saved_report(self, model_file: dict) -> dict:
        """:meth:`report`'s widths (no history) of a saved model file, e.g. the best model
        (``checkpoint.read_model_file``): β from its hook state, sizes from its weights."""
        widths: dict[str, float] = {}
        sizes: dict[str, int] = {}
        for key, beta in model_file["hook_state"].items():
            if key.endswith(".precision.beta"):
                weight = key.split(".parametrizations.")[0]  # convs.<i>.<map>
                conv = weight.rsplit(".", 1)[0]
                widths[conv] = float(beta.clamp(self.low, self.high))
                sizes[conv] = sizes.get(conv, 0) + model_file["model"][f"{weight}.weight"].numel()
        if not widths:
            raise ValueError("the model file holds no ldp widths: was it trained with --hook ldp?")
        return _deployed(list(widths.values()), list(sizes.values()))


def _deployed(widths: list[float], sizes: list[int]) -> dict:
    """Per layer the deployed width ⌈b_l⌉; their mean weighted by the layers' weights n_l and
    the storage ratio 32 / mean."""
    deployed = [deployed_width(b) for b in widths]
    mean = sum(b * n for b, n in zip(deployed, sizes, strict=True)) / sum(sizes)
    return {"bits_per_layer": deployed, "avg_bits": mean, "ratio": 32 / mean}
