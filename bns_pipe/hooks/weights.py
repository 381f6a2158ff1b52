"""The conv weights that weight hooks parametrize, and plain-named state dicts.

Weight hooks register ``torch.nn.utils.parametrize`` parametrizations on the conv layers'
2-D weights (``lin.weight``, SAGE's ``lin_l.weight`` and ``lin_r.weight``). A parametrized
module's state dict names its latent tensor ``<prefix>.parametrizations.weight.original``
and the parametrization's own tensors ``<prefix>.parametrizations.weight.<i>.<name>``;
checkpoints keep the plain names instead, holding the weight the model computes with in
evaluation, so a checkpoint loads into a model without the hook and scores the same; the
parametrizations' own tensors (e.g. learned bit widths) are kept apart, for resuming.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["conv_weights", "hook_tensors", "load_plain_state_dict", "plain_state_dict"]

LATENT = ".parametrizations.weight.original"
OWN = ".parametrizations.weight."


def conv_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every conv layer's linear map with a 2-D ``weight``, in order."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.startswith("convs.") and isinstance(module, nn.Linear) and weight.dim() == 2:
            yield name, module


def plain_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(plain, own): ``model.state_dict()`` with every parametrized weight under its plain
    name as the model computes with it in evaluation, and the parametrizations' own tensors."""
    plain, own = {}, {}
    training = model.training
    model.eval()
    try:
        for key, value in model.state_dict().items():
            if key.endswith(LATENT):
                prefix = key[: -len(LATENT)]
                with torch.no_grad():
                    plain[f"{prefix}.weight"] = model.get_submodule(prefix).weight.detach().clone()
            elif OWN in key:  # the parametrizations' own tensors (hook_tensors)
                own[key] = value
            else:
                plain[key] = value
    finally:
        model.train(training)
    return plain, own


def hook_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parametrizations' own tensors of ``model``'s state dict, as they are."""
    return {k: v for k, v in model.state_dict().items() if OWN in k and not k.endswith(LATENT)}


def load_plain_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor] | None = None
) -> None:
    """Load a plain-named ``state`` (and the parametrizations' ``own`` tensors) into
    ``model``, parametrized or not: a parametrized weight's latent tensor takes the saved
    weight."""
    renamed = dict(own or {})
    for key, value in state.items():
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix is not None and _parametrized(model, prefix):
            key = f"{prefix}{LATENT}"
        renamed[key] = value
    model.load_state_dict(renamed)


def _parametrized(model: nn.Module, prefix: str) -> bool:
    try:
        return parametrize.is_parametrized(model.get_submodule(prefix), "weight")
    except AttributeError:
        return False
