"""Every sample's squared gradient norm per parameter tensor, or per group of them.

    sq, names = per_parameter_sqnorms(model, loader)                    # -> [N, P], P parameter names
    sq, names = per_parameter_sqnorms(model, loader, group="module")    # -> [N, M], one column per module
    sq, names = per_parameter_sqnorms(model, loader, group=["layer1", "layer2", "fc"])   # by name prefix

sq[n, j] = || d loss_n / d theta_j ||^2 summed over the parameters of group j, exactly as the
other entry points compute their scores (the same pass: per-parameter squared norms are what
every backend returns before the norm is taken), in pool order. For layer-wise clipping,
TracIn on chosen layers, or any norm of your own: score_pool's frobenius score is
sqrt(sq.sum(1)) over the "parameter" grouping.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .api import score_each_sample
from .job import scored_module, select_params

Grouping = str | Sequence[str] | Callable[[str], str]


def per_parameter_sqnorms(model: nn.Module, loader: Iterable, *, group: Grouping = "parameter",
                          distributed: bool | None = None, **options) -> tuple[torch.Tensor, list[str]]:
    """Per-sample squared norms per parameter tensor or group.  -> (Tensor [N, G], G names)

    ``group``: "parameter" (one column per measured parameter, named as in
    ``model.named_parameters()``), "module" (one per module owning parameters, named by its
    path), a list of name prefixes (each parameter goes to the longest prefix it starts with at a
    dot boundary; every measured parameter must match one), or a callable parameter name ->
    group name. Takes every keyword option of ``score_pool`` but ``norm`` (squared norms are
    returned as they are), label-aware scores included; under torch.distributed every rank
    returns all N rows.
    """
    if "norm" in options:
        raise TypeError("per_parameter_sqnorms returns squared norms per parameter, so norm= does not apply; "
                        "drop it (score_pool takes norm=)")
    chosen = select_params(scored_module(model), options.get("params"))
    names = [n for n, _ in chosen]
    if options.get("params") is not None:   # as parameters: the names are those of the scored module
        options["params"] = [p for _, p in chosen]
    group_names, matrix = parameter_groups(names, group)

    def per_chunk(engine, x) -> torch.Tensor:   # [B, P] -> [B, G]
        sq = engine.sqnorms(x)
        return sq if matrix is None else sq @ matrix.to(sq.device, sq.dtype)

    return score_each_sample(model, loader, options, distributed, per_chunk=per_chunk,
                             what=f"per-parameter {group_names}"), group_names


def under_prefix(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` is ``prefix`` or lies under it at a dot boundary ("layer1" holds
    "layer1.0.conv1.weight", not "layer10.weight")."""
    return name == prefix or name.startswith(prefix + ".")


def parameter_groups(names: list[str], group: Grouping) -> tuple[list[str], torch.Tensor | None]:
    """The groups' names and the [P, G] 0/1 matrix summing parameters into them (None: one per parameter)."""
    if group == "parameter":
        return list(names), None
    if group == "module":
        label = [n.rpartition(".")[0] or "(model)" for n in names]
    elif callable(group):
        label = [str(group(n)) for n in names]
    elif isinstance(group, Sequence) and not isinstance(group, str) and all(isinstance(p, str) for p in group):
        prefixes = sorted(set(group), key=len, reverse=True)
        label = [next((p for p in prefixes if under_prefix(n, p)), None) for n in names]
        missing = [n for n, lab in zip(names, label) if lab is None]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"group= prefixes {list(group)} cover no prefix of {shown}; add a prefix for them, "
                             "or leave them out with params=")
        order = {p: i for i, p in enumerate(group)}
        groups = sorted(set(label), key=lambda p: order[p])
        return groups, _membership(label, groups)
    else:
        raise ValueError(f"group must be 'parameter', 'module', a list of name prefixes or a callable name -> "
                         f"group, got {group!r}")
    groups = list(dict.fromkeys(label))   # in order of first appearance
    return groups, _membership(label, groups)


def _membership(label: list[str], groups: list[str]) -> torch.Tensor:
    column = {g: j for j, g in enumerate(groups)}
    matrix = torch.zeros(len(label), len(groups), dtype=torch.float64)
    for i, g in enumerate(label):
        matrix[i, column[g]] = 1.0
    return matrix
