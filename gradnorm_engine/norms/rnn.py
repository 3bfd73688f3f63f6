"""nn.LSTM, nn.GRU and nn.RNN: the fused recurrent kernel replaced, in the recorded forward, by an
unrolled computation whose input projection carries every gate gradient.

Per layer and direction, with xw = x W_ih^T + b_ih computed for all T steps at once:
  LSTM, RNN  gates_t = xw_t + h_{t-1} W_hh^T + b_hh, so d gates_t = d xw_t, and
             G(W_ih)_b = sum_t dxw_t x_t^T,  G(W_hh)_b = sum_t dxw_t h_{t-1}^T,  G(b_ih) = G(b_hh) = sum_t dxw_t
  GRU        r, z from xw_t + hh_t; n = tanh(xn_t + r_t * hn_t) with hh_t = h_{t-1} W_hh^T + b_hh, so
             d hh_t = [dxw_r, dxw_z, r_t * dxw_n]
One tensor hook on xw gives every gate gradient; each weight's per-sample gradient is a sum over
time of outer products, scored by the Linear forms (norms/forms.py: Gram over the T steps, or
materialised) once per weight: a multi-use Gram for the recurrence. In float64 the unrolled
forward equals the fused one; in float32 it rounds differently (about 1e-7).

Not unrolled (the parameters go to the exact fallback): PackedSequence inputs, LSTM projections
(proj_size), dropout between layers in training mode, inputs whose batch is not the layer's
batch dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .forms import weight_sqnorm
from .layout import Unknown
from .ops import OpCall, OpRule, per_sample_result
from .registry import accum_dtype

KINDS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def is_unrollable(name: str, args: tuple) -> bool:
    """Whether a call of ``torch.<name>`` is one ``unrolled`` takes: the padded-tensor form it
    unrolls, (input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
    batch_first), or the PackedSequence form, whose parameters it sends to the fallback, naming why."""
    return name in KINDS and len(args) == 9 and (_is_padded(args) or _is_packed(args))


def _is_padded(args: tuple) -> bool:
    return isinstance(args[2], (list, tuple)) and isinstance(args[3], bool)


def _is_packed(args: tuple) -> bool:
    """(data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)."""
    return isinstance(args[3], (list, tuple)) and isinstance(args[4], bool)


def rnn_op(call: OpCall, grad: torch.Tensor, wants_norm) -> dict:
    """The unrolled layer's weights from the gate gradients dxw [B, T, G*H]."""
    xs, hprev, rs, w_ih, w_hh, b_ih, b_hh = call.args
    acc = accum_dtype(grad)
    if rs is not None:          # GRU: the n gate's recurrent part is scaled by r
        hidden = hprev.shape[2]
        g_hh = torch.cat([grad[..., :2 * hidden], grad[..., 2 * hidden:] * rs], dim=-1)
    else:
        g_hh = grad
    out = {}
    for pos, a, g in ((3, xs, grad), (4, hprev, g_hh)):
        if pos in call.pins:
            out[pos] = weight_sqnorm(a, g) if wants_norm(pos) else \
                torch.bmm(g.to(acc).transpose(1, 2), a.to(acc))
    for pos, g in ((5, grad), (6, g_hh)):
        if pos in call.pins:
            out[pos] = per_sample_result(g.to(acc).sum(dim=1), wants_norm(pos))
    return out


RNN_RULE = OpRule(rnn_op, form=lambda c, slot: f"linear forms over the {c.args[0].shape[1]} steps" if slot in (3, 4)
                  else "sum over the steps")


def unrolled(recording, kind: str, *args):
    """The result of torch.<kind>(*args) computed step by step, with one recorded call per layer
    and direction. ``recording`` is the recorder (backends/recording.py): it gives layouts and
    parameter marks, takes the calls, and runs the fused kernel where this cannot."""
    if _is_packed(args):
        # a PackedSequence: the samples are interleaved along the data's rows, step by step
        recording.fail(args[3], f"{kind}: a PackedSequence input (the unrolling takes padded tensors)")
        out = getattr(torch, kind)(*args)
        for o in out:
            if isinstance(o, torch.Tensor):
                recording.set_layout(o, Unknown(kind, "a PackedSequence's rows interleave the samples"))
        return out
    return _unrolled_padded(recording, kind, *args)


def _unrolled_padded(recording, kind: str, input, hx, params, has_biases: bool, num_layers: int, dropout: float,
                     train: bool, bidirectional: bool, batch_first: bool):
    batch_dim = 0 if batch_first else 1
    directions = 2 if bidirectional else 1
    per_layer = 4 if has_biases else 2
    fused = getattr(torch, kind)
    problem = None
    if recording.layout(input) != (batch_dim, 1) or input.dim() != 3:
        problem = "the input's batch is not the layer's batch dim"
    elif train and dropout > 0:
        problem = "dropout between layers in training mode"
    elif len(params) != num_layers * directions * per_layer:
        problem = "LSTM projections (proj_size)"
    if problem:
        recording.fail(params, f"{kind}: {problem}")
        return fused(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    x = input if batch_first else input.transpose(0, 1)                # (B, T, in)
    steps_total = x.shape[1]
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    layer_in = x
    h_last, c_last = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            first = (layer * directions + direction) * per_layer
            w_ih, w_hh = params[first], params[first + 1]
            b_ih, b_hh = (params[first + 2], params[first + 3]) if has_biases else (None, None)
            xs = layer_in if direction == 0 else layer_in.flip(1)
            xw = F.linear(xs, w_ih, b_ih)                                   # (B, T, G*H)
            h = h0[layer * directions + direction]
            c = c0[layer * directions + direction] if c0 is not None else None
            previous, resets, states = [], [], []
            for t in range(steps_total):
                previous.append(h)
                hh = F.linear(h, w_hh, b_hh)
                if kind == "lstm":
                    i, f, g, o = (xw[:, t] + hh).chunk(4, 1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif kind == "gru":
                    xr, xz, xn = xw[:, t].chunk(3, 1)
                    hr, hz, hn = hh.chunk(3, 1)
                    r = torch.sigmoid(xr + hr)
                    z = torch.sigmoid(xz + hz)
                    n = torch.tanh(xn + r * hn)
                    h = (1 - z) * n + z * h
                    resets.append(r.detach())
                else:
                    h = torch.tanh(xw[:, t] + hh) if kind == "rnn_tanh" else torch.relu(xw[:, t] + hh)
                states.append(h)
            sequence = torch.stack(states, 1)                               # (B, T, H)
            weights = (w_ih, w_hh, b_ih, b_hh)
            call = OpCall(kind, None, RNN_RULE)
            call.args = (xs.detach(), torch.stack(previous, 1).detach(),
                         torch.stack(resets, 1) if resets else None, *weights)
            call.lays = [(0, 1), (0, 1), None, None, None, None, None]
            call.pins = {3 + j: w for j, w in enumerate(weights) if w is not None and recording.is_pin(w)}
            # W_ih and b_ih once (one projection for all steps), W_hh and b_hh once per step
            call.uses = {id(w): (1 if j in (0, 2) else steps_total) for j, w in enumerate(weights) if w is not None}
            ends = [sequence, h] + ([c] if c is not None else [])
            recording.add_call(call, xw, ends)
            outputs.append(sequence if direction == 0 else sequence.flip(1))
            h_last.append(h)
            if c is not None:
                c_last.append(c)
        layer_in = torch.cat(outputs, -1) if directions == 2 else outputs[0]
    output = layer_in if batch_first else layer_in.transpose(0, 1)
    recording.set_layout(output, (batch_dim, 1))
    hy = torch.stack(h_last, 0)
    recording.set_layout(hy, (1, 1))
    if kind == "lstm":
        cy = torch.stack(c_last, 0)
        recording.set_layout(cy, (1, 1))
        return output, hy, cy
    return output, hy
