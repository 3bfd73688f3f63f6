"""Which parameters the rules of one recorded forward score, and how: read from its autograd graph.

    plan = Coverage(loss.grad_fn, recorder, measured)
    plan.failed        id(parameter) -> why the exact fallback scores it
    plan.as_norm       ids of the parameters one rule scores as a norm
    plan.edges         the gradient edges the rules' backward asks for

A rule sees only the use it was called on. A measured parameter is left to the rules when every
way it reaches the loss runs through a recorded use:

* coverage: from the parameter's AccumulateGrad node, every path towards the loss first meets the
  output node of a recorded op that takes the parameter itself (or a derivation of it, whose
  derived tensors are then held to the same test); a path that reaches the loss another way is a
  use the recording did not see (C++ internals, a custom autograd.Function, TorchScript, a tensor
  nested two lists deep in an op's arguments);
* count: the graph's uses of the parameter (graph.Graph.uses, which sees through casts) are no
  more than the recorded ones, so no unseen use hides behind a recorded one;
* no mixing below the loss: no recorded use's output reaches the loss through a tensor whose
  sample layout was lost (``Recorder.mixing``): h - h.mean(0), h.sort(0), h @ h.T, a write of
  another sample's row; the gradient a rule reads there holds several samples' losses.

Every parameter behind a failed derived tensor fails with it. Then

* a parameter with one recorded use and no derived tensor is scored by its rule as a norm
  (the closed forms: Gram, materialise, ...);
* every other one (several uses: tied weights, a layer applied twice, MHA's packed in_proj used
  thrice; or a derived use) gets per-sample gradients [B, *shape] from each use, summed, the derived
  ones carried to the parameters by one batched vector-Jacobian product (``derived_vjp``);
* a parameter of a layer with a user rule (a module rule gives norms) is scored by that rule when
  the layer ran once and nothing else uses the parameter.
"""
from __future__ import annotations

import torch

from ..memory import is_out_of_memory
from .graph import Graph
from .recording import ModuleCall, Recorder


class Coverage:
    def __init__(self, root, recorder: Recorder, measured: dict):
        self.recorder = recorder
        graph = Graph(root)
        self.in_graph = set(graph.leaf_nodes)            # ids of the parameters the loss reaches
        self.failed: dict[int, str] = {}
        check = recorder.check
        graph_uses = graph.uses(set(check))

        for pid in measured:
            node = graph.leaf_nodes.get(pid)
            if node is None:
                continue
            if pid in recorder.failed:
                self.failed[pid] = recorder.failed[pid]
                continue
            unseen = self._unseen_use(graph, node, {pid}, via=pid)
            if unseen is not None:
                self.failed[pid] = unseen
            elif pid in recorder.in_modules:
                calls = recorder.in_modules[pid]
                if len(calls) != 1 or recorder.uses.get(pid, 0):
                    self.failed[pid] = (f"its layer's rule ({calls[0].name if calls else '?'}) gives a norm, which "
                                        "cannot be summed with the parameter's other uses")
            elif graph_uses.get(pid, 0) > recorder.uses.get(pid, 0):
                self.failed[pid] = (f"the graph shows {graph_uses[pid]} uses, the recording saw "
                                    f"{recorder.uses.get(pid, 0)}: a use it did not see")

        derived_failed: dict[int, str] = {}
        self._mixed_below(graph, recorder, measured, derived_failed)
        for did, tensor in recorder.derived.items():
            if did in derived_failed:
                continue
            if did in recorder.failed:
                derived_failed[did] = recorder.failed[did]
                continue
            node = tensor.grad_fn
            if node not in graph:
                continue                                  # unused, or not on the way to the loss
            unseen = self._unseen_use(graph, node, recorder.derivations.get(node, set()) | {did})
            if unseen is not None:
                derived_failed[did] = unseen
        for did, reason in derived_failed.items():
            for pid in recorder.derived_from.get(did, ()):
                if pid in self.in_graph:
                    self.failed.setdefault(pid, f"through a tensor derived from it: {reason}")

        # how each covered parameter is scored
        direct: dict[int, int] = {}
        for call in recorder.calls:
            if not isinstance(call, ModuleCall):
                for t in call.pins.values():
                    if id(t) in measured:
                        direct[id(t)] = direct.get(id(t), 0) + 1
        behind_derived = set()
        for did in recorder.derived:
            if did not in derived_failed and recorder.derived[did].grad_fn in graph:
                behind_derived |= recorder.derived_from.get(did, frozenset())
        self.as_norm = {pid for pid, n in direct.items() if n == 1 and pid not in behind_derived}
        self.as_norm |= {pid for pid in recorder.in_modules if pid not in self.failed}
        self.behind_derived = behind_derived

        # the lowest recorded outputs: the backward to them passes every other one
        active = [c for c in recorder.calls if c.edge is not None and c.edge.node in graph and self.active(c)]
        nodes = {c.edge.node for c in active}
        above = graph.above(nodes)
        self.edges = [c.edge for c in active if c.edge.node not in above]
        self.calls = active
        self.active_ids = {id(c) for c in active}      # the calls whose rule runs in the backward

    def _mixed_below(self, graph: Graph, recorder: Recorder, measured: dict, derived_failed: dict) -> None:
        """Fail every parameter (and derived tensor) of a recorded use whose output reaches the loss
        through a tensor whose sample layout was lost (``recorder.mixing``: a mean, sort or matmul
        over the batch, a write of another sample's values): the gradient the rule would read there
        mixes several samples' losses. The loop scores each sample alone; the fallback does too."""
        mixing = [node for node in recorder.mixing if node in graph]
        if not mixing:
            return
        below = graph.below(mixing)
        reason = (f"its output reaches the loss through {recorder.mixing[mixing[0]].describe()}, where the sample "
                  "layout is lost: the gradient there mixes samples")
        for node, ids in recorder.check.items():
            if node not in below:
                continue
            for i in ids:
                if i in measured:
                    if i in graph.leaf_nodes:
                        self.failed.setdefault(i, reason)
                elif i in recorder.derived:
                    derived_failed.setdefault(i, reason)

    def active(self, call) -> bool:
        """Whether a call scores anything: a parameter, or a derived tensor, that has not failed."""
        ids = [id(p) for p in call.params] if isinstance(call, ModuleCall) else [id(t) for t in call.pins.values()]
        return any(i not in self.failed and i not in self.recorder.failed for i in ids)

    def wants_norm(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.as_norm

    def _unseen_use(self, graph: Graph, node, allowed: set, via: int | None = None) -> str | None:
        """Why ``node`` (a parameter's, or a derived tensor's) has a use the recording did not see, or None."""
        stray = self._stray_path(graph, graph.parents[node], allowed, via)
        return None if stray is None else f"a use the recording did not see: the graph reaches the loss through {stray}"

    def _stray_path(self, graph: Graph, start: list, allowed: set, via: int | None = None):
        """None when every path up from ``start`` first meets a check node taking one of ``allowed``
        (or, for a parameter, a derivation node whose outputs come from it); else a description of
        the node where a path got through."""
        check, derivations, derived_from = self.recorder.check, self.recorder.derivations, self.recorder.derived_from
        seen = set()
        todo = [(node, node) for node in start]          # (node, the first node of its path)
        while todo:
            node, first = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in check:
                if check[node] & allowed:
                    continue
                if via is not None and any(via in derived_from.get(o, ()) for o in derivations.get(node, ())):
                    continue
                return f"{type(first).__name__} (up to {type(node).__name__}, a recorded op that does not take it)"
            parents = graph.parents.get(node, [])
            if not parents:
                return f"{type(first).__name__} (up to the loss, past every recorded op)"
            todo.extend((p, first) for p in parents)
        return None


def derived_vjp(grads: dict, recorder: Recorder, measured: dict) -> dict:
    """{id(parameter): per-sample gradient [B, *shape]} carried from the per-sample gradients of
    derived tensors (``grads``: id -> [B, *shape]) through their derivations, the chain rule for
    all samples in one batched vector-Jacobian product. Raises what autograd raises."""
    ids = list(grads)
    if not ids:
        return {}
    tensors = [recorder.derived[d] for d in ids]
    leaf_ids = sorted(set().union(*(recorder.derived_from[d] for d in ids)))
    leaves = [measured[i] for i in leaf_ids]
    outputs = [grads[d].to(t.dtype) for d, t in zip(ids, tensors)]
    # retained: the derivation graph is part of the forward's (freed with it), and the next loss needs it
    try:
        carried = torch.autograd.grad(tensors, leaves, grad_outputs=outputs, is_grads_batched=True,
                                      allow_unused=True, retain_graph=True)
    except Exception as err:  # noqa: BLE001 - a derivation whose backward has no batching rule
        if is_out_of_memory(err):
            raise
        carried = _vjp_per_sample(tensors, leaves, outputs)
    return {i: v for i, v in zip(leaf_ids, carried) if v is not None}


def _vjp_per_sample(tensors, leaves, outputs):
    batch = outputs[0].shape[0]
    rows = []
    for b in range(batch):
        rows.append(torch.autograd.grad(tensors, leaves, grad_outputs=[o[b] for o in outputs], allow_unused=True,
                                        retain_graph=True))
    return [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(leaves))]
