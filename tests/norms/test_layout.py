"""norms/layout.py through the recorder, op by op, against ground truth: perturb sample j of the
inputs and exactly the output positions the tracked layout assigns to j change; an op that moves
or mixes samples gets Unknown."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from gradnorm_engine.backends.recording import Recorder
from gradnorm_engine.norms.layout import Unknown, is_unknown, regroup, reshape_layout

B, T, D = 3, 4, 5


def sample_of(shape, lay, batch=B) -> torch.Tensor:
    """The sample each position of a tensor of ``shape`` belongs to, by the layout."""
    k, inner = lay
    index = (torch.arange(shape[k]) // inner) % batch
    view = [1] * len(shape)
    view[k] = shape[k]
    return index.view(view).expand(shape)


def traced(fn, *inputs):
    """fn(*inputs) under the recorder -> (output, its layout)."""
    recorder = Recorder(B, {}, list(inputs))
    with recorder:
        out = fn(*inputs)
    lay = recorder.layout(out) if isinstance(out, torch.Tensor) else [recorder.layout(o) for o in out]
    recorder.release()
    return out, lay


def assert_tracks(fn, *inputs, expected=None, constants=False):
    """The layout of fn's output assigns to sample j exactly the positions that change when the
    inputs' sample j changes (every input batched on dim 0); with ``constants`` (padding, written
    constants) the changed positions are among sample j's and there are some."""
    out, lay = traced(fn, *inputs)
    assert not is_unknown(lay) and lay is not None, lay
    if expected is not None:
        assert lay == expected
    owner = sample_of(tuple(out.shape), lay)
    for j in range(B):
        moved = []
        for t in inputs:
            t = t.clone()
            if t.is_floating_point():
                t[j] += torch.rand(t[j].shape, dtype=t.dtype) + 0.5
            elif t.dtype == torch.bool:
                t[j] = ~t[j]
            else:
                t[j] = (t[j] + 1) % 7
            moved.append(t)
        changed = fn(*moved) != out
        if constants:
            assert changed.any() and not (changed & (owner != j)).any(), (lay, j)
        else:
            assert torch.equal(changed, owner == j), (lay, j)
    return lay


def x3(*shape):
    return torch.randn(*shape, dtype=torch.float64)


W = torch.randn(6, D, dtype=torch.float64)
KERNEL = torch.randn(2, 3, 3, 3, dtype=torch.float64)


@pytest.mark.parametrize("fn, shape, expected", [
    (lambda x: x.view(-1, D), (B, T, D), (0, T)),                        # HF Conv1D: b-major rows
    (lambda x: x.reshape(-1), (B, T, D), (0, T * D)),
    (lambda x: x.flatten(1), (B, T, D), (0, 1)),
    (lambda x: x.unflatten(1, (2, 2)), (B, T, D), (0, 1)),
    (lambda x: x.transpose(0, 1).reshape(T * B, D), (B, T, D), (0, 1)),   # MHA's t-major rows
    (lambda x: x.transpose(0, 1).reshape(T * B, D).view(T, B, D), (B, T, D), (1, 1)),
    (lambda x: x.view(B, 2, 2, 2, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, D), (B, 4, 4, D), (0, 4)),  # windows
    (lambda x: x.permute(2, 0, 1), (B, T, D), (1, 1)),
    (lambda x: x.movedim(0, -1), (B, T, D), (2, 1)),
    (lambda x: x.mT, (B, T, D), (0, 1)),
    (lambda x: x.t(), (B, D), (1, 1)),
    (lambda x: x.unsqueeze(0).squeeze(0).unsqueeze(2), (B, T, D), (0, 1)),
    (lambda x: x[:, :1].expand(B, T, D), (B, T, D), (0, 1)),
    (lambda x: x[:, 0], (B, T, D), (0, 1)),
    (lambda x: x[:, 1:3, None], (B, T, D), (0, 1)),
    (lambda x: x[..., [0, 2]], (B, T, D), (0, 1)),
    (lambda x: x[:, torch.tensor([[0, 1], [2, 3]])], (B, T, D), (0, 1)),
    (lambda x: x[torch.arange(B)[:, None, None], :, torch.tensor([0, 1])], (B, T, D), (0, 1)),  # HF's padding masks
    (lambda x: x.select(1, 2), (B, T, D), (0, 1)),
    (lambda x: x.narrow(2, 1, 2), (B, T, D), (0, 1)),
    (lambda x: torch.cat([x, x * 2], dim=2), (B, T, D), (0, 1)),
    (lambda x: torch.stack([x, x + 1], dim=0), (B, T, D), (1, 1)),
    (lambda x: x.split(2, dim=1)[1], (B, T, D), (0, 1)),
    (lambda x: x.unbind(1)[2], (B, T, D), (0, 1)),
    (lambda x: x.sum(dim=(1, 2)), (B, T, D), (0, 1)),
    (lambda x: x.mean(-1, keepdim=True), (B, T, D), (0, 1)),
    (lambda x: x.max(dim=1).values, (B, T, D), (0, 1)),
    (lambda x: x.var(2, True), (B, T, D), (0, 1)),                        # var(x, dim, unbiased)
    (lambda x: x.norm(dim=-1), (B, T, D), (0, 1)),
    (lambda x: x.softmax(-1), (B, T, D), (0, 1)),
    (lambda x: x.cumsum(1), (B, T, D), (0, 1)),
    (lambda x: x.flip(2), (B, T, D), (0, 1)),
    (lambda x: x.topk(2, dim=-1).values, (B, T, D), (0, 1)),
    (lambda x: x.roll(1, dims=2), (B, T, D), (0, 1)),
    (lambda x: x.repeat(2, 1, 1), (B, T, D), (0, 1)),                     # tiles keep the batch's period
    (lambda x: x.gather(2, torch.zeros(B, T, 2, dtype=torch.long)), (B, T, D), (0, 1)),
    (lambda x: x @ W.t(), (B, T, D), (0, 1)),
    (lambda x: x @ x.transpose(-1, -2), (B, T, D), (0, 1)),
    (lambda x: torch.einsum("btd,ed->bte", x, W), (B, T, D), (0, 1)),
    (lambda x: torch.einsum("btd->dtb", x), (B, T, D), (2, 1)),
    (lambda x: F.linear(x.transpose(0, 1), W), (B, T, D), (1, 1)),
    (lambda x: F.layer_norm(x.permute(0, 2, 3, 1), (4,)), (B, 4, 3, 2), (0, 1)),   # ConvNeXt's LayerNorm2d
    (lambda x: F.conv2d(x, KERNEL, padding=1), (B, 3, 5, 5), (0, 1)),
    (lambda x: F.max_pool2d(x, 2), (B, 3, 4, 4), (0, 1)),
    (lambda x: F.scaled_dot_product_attention(x, x, x), (B, 2, T, D), (0, 1)),
    (lambda x: torch.where(x > 0, x, x * 2).exp() + 1, (B, T, D), (0, 1)),
])
def test_views_and_ops_keep_every_sample_where_the_layout_says(fn, shape, expected):
    torch.manual_seed(0)
    assert_tracks(fn, x3(*shape), expected=expected)


def test_padding_keeps_the_layout():
    assert_tracks(lambda x: F.pad(x, (1, 2, 0, 1)), x3(B, T, D), expected=(0, 1), constants=True)


def test_two_batched_inputs_and_integer_ids():
    torch.manual_seed(0)
    table = torch.randn(7, D, dtype=torch.float64)
    assert_tracks(lambda x, y: x * y.transpose(1, 2), x3(B, T, D), x3(B, D, T))
    assert_tracks(lambda ids, x: F.embedding(ids, table) + x, torch.randint(0, 7, (B, T)), x3(B, T, D))
    # GPT-2's pooling: row arange(B) and each sample's own last position
    assert_tracks(lambda x, last: x[torch.arange(B), last], x3(B, T, D), torch.randint(0, T, (B,)))


def test_a_batch_free_tensor_filled_from_batched_data_in_place_takes_its_layout():
    torch.manual_seed(0)
    mask = torch.rand(B, T, dtype=torch.float64) > 0.5
    assert_tracks(lambda m: torch.zeros_like(m, dtype=torch.float64).masked_fill_(m, 2.0) + 1, mask)


def test_writing_constants_keeps_the_layout_and_other_samples_data_loses_it():
    def constants(x):
        x = x.clone()
        x[:, 0] = 0.0
        return x * 2
    assert_tracks(constants, x3(B, T, D), constants=True)

    def swapped(x):
        x = x.clone()
        x[0] = x[1]
        return x
    _, lay = traced(swapped, x3(B, T, D))
    assert is_unknown(lay)


@pytest.mark.parametrize("fn, op", [
    (lambda x: x.flip(0), "flip"),
    (lambda x: x.index_select(0, torch.tensor([2, 0, 1])), "index_select"),
    (lambda x: x.sort(dim=0).values, "sort"),
    (lambda x: x.roll(1, dims=0), "roll"),
    (lambda x: x[1:], "__getitem__"),
    (lambda x: x[0], "__getitem__"),
    (lambda x: x.sum(), "sum"),
    (lambda x: x.mean(0), "mean"),
    (lambda x: x.softmax(0), "softmax"),
    (lambda x: torch.cat([x, x], dim=0), "cat"),
    (lambda x: x.view(B * T * D // 2, 2)[::2], "__getitem__"),
    (lambda x: x.reshape(T, B, D), "reshape"),                           # splits the batch across dims
    (lambda x: x.transpose(0, 2) @ torch.ones(B, 2, dtype=x.dtype), "matmul"),   # contracts over the batch
    (lambda x: torch.ones(2, B, dtype=x.dtype) @ x.reshape(B, T * D), "matmul"),
    (lambda x: torch.fft.fft(x, dim=1).real, "fft_fft"),                  # not known to keep samples apart
])
def test_ops_that_move_or_mix_samples_lose_the_layout(fn, op):
    torch.manual_seed(0)
    _, lay = traced(fn, x3(B, T, D))
    assert is_unknown(lay)
    assert isinstance(lay, Unknown) and lay.op == op, lay


def test_an_unknown_input_names_the_op_that_first_lost_the_samples():
    _, lay = traced(lambda x: (x.flip(0) * 2).view(-1).softmax(-1), x3(B, T, D))
    assert is_unknown(lay) and lay.op == "flip"


@settings(max_examples=40, deadline=None)
@given(dims=st.lists(st.integers(1, 3), min_size=1, max_size=3), k=st.integers(0, 3), batch=st.integers(1, 3),
       split=st.integers(0, 4), seed=st.integers(0, 100))
def test_reshape_layout_matches_the_row_major_order(dims, k, batch, split, seed):
    """Any reshape: a position's sample by the layout equals the sample of the source position it
    came from; Unknown only when no single dim holds the samples."""
    k = min(k, len(dims))
    src = tuple(dims[:k]) + (batch,) + tuple(dims[k:])
    owner = sample_of(src, (k, 1), batch).reshape(-1)
    total = owner.numel()
    gen = torch.Generator().manual_seed(seed)
    # a random factorisation of the total as the destination shape
    dst, rest = [], total
    for _ in range(split):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        d = divisors[int(torch.randint(len(divisors), (1,), generator=gen))]
        dst.append(d)
        rest //= d
    dst.append(rest)
    lay = reshape_layout(src, (k, 1), tuple(dst), batch)
    if is_unknown(lay):
        return
    assert torch.equal(sample_of(tuple(dst), lay, batch).reshape(-1), owner)


def test_regroup_puts_each_samples_positions_on_dim_0():
    x = torch.arange(2 * B * 3 * 4).view(2 * B * 3, 4)            # rows: outer 2, batch B, inner 3
    grouped = regroup(x, (0, 3), B)
    owner = sample_of(tuple(x.shape), (0, 3))
    for b in range(B):
        assert torch.equal(grouped[b].reshape(-1).sort().values, x[owner == b].reshape(-1).sort().values)
