"""The hooks backend's recorded ops, one small model per parameter type it must score without the
exact fallback: nn.MultiheadAttention (through F.multi_head_attention_forward), torchvision's
Swin, ConvNeXt and VisionTransformer, LSTM/GRU/RNN, weight_norm and spectral_norm, PReLU,
InstanceNorm2d, ConvTranspose2d, EmbeddingBag, Hugging Face's Conv1D and a Linear called with
keyword arguments.

For each: ``explain`` leaves no parameter to the fallback (its report is the assertion message),
and ``score_pool(backend="hooks")`` equals the per-sample loop in float64 (rtol 1e-9); a subset
also in float32 against the float64 loop. The LSTM and MHA models score the same in chunks of 2
as in one pass, and an LSTM fed a PackedSequence (which the unrolling does not take) is scored
exactly by the fallback, with explain naming why."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from gradnorm_engine import explain, score_pool
from gradnorm_engine.backends.hooks import FallbackShareWarning
from tests.reference import max_rel_err, reference_scores

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # the self-check against the loop must never fire on models the rules read correctly
              pytest.mark.filterwarnings("error::gradnorm_engine.backends.hooks.HooksFallbackWarning")]

B, T, D, VOCAB = 4, 5, 6, 13


def _perturbed(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Every parameter moved off its initial value: torchvision zero-initialises heads, class
    tokens and biases, and an untrained model's near-uniform logits give near-zero gradients, so
    comparisons would mean little."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _tokens(n: int) -> torch.Tensor:
    """Token ids [n, T] with right padding (id 0): sample i has T - i % 3 tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    for i in range(n):
        ids[i, T - i % 3:] = 0
    return ids


def _vectors(n: int, *shape: int):
    return lambda: torch.randn(n, *shape, generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------- nn.MultiheadAttention
class SelfAttention(nn.Module):
    """Token ids -> embedding -> self-attention (padding keys masked) -> mean -> head."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(VOCAB, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids)                                        # (B, T, 8)
        pad = ids == 0
        if not self.batch_first:
            h = h.transpose(0, 1)                                  # (T, B, 8)
        out, _ = self.attn(h, h, h, key_padding_mask=pad)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(1))


class CrossAttention(nn.Module):
    """Queries from one projection, keys and values from others. With kdim and vdim other than
    embed_dim, q_proj_weight, k_proj_weight and v_proj_weight are separate parameters; with
    kdim = vdim = embed_dim the packed in_proj_weight is split three ways (derived tensors)."""

    def __init__(self, kdim: int = 5, vdim: int = 7):
        super().__init__()
        self.keys = nn.Linear(D, kdim)
        self.values = nn.Linear(D, vdim)
        self.query = nn.Linear(D, 8)
        self.attn = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=vdim, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):                                          # (B, T, D)
        k, v = torch.tanh(self.keys(x)), torch.tanh(self.values(x))
        out, _ = self.attn(self.query(x), k, v)
        return self.head(out.mean(1))


# ---------------------------------------------------------------- torchvision
def swin():
    return _perturbed(SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                      window_size=[2, 2], num_classes=3), 0.1)


def convnext():
    # layer_scale 0.5 (torchvision's 1e-6 makes every block's contribution vanish)
    return _perturbed(ConvNeXt([CNBlockConfig(4, 8, 1), CNBlockConfig(8, None, 1)], layer_scale=0.5,
                               num_classes=3), 0.1)


def vit():
    return _perturbed(VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                        mlp_dim=16, num_classes=3), 0.1)


# ---------------------------------------------------------------- recurrent layers
class Recurrent(nn.Module):
    """x [B, T, D] -> an LSTM/GRU/RNN -> its last output and final hidden state -> head."""

    def __init__(self, kind: str, num_layers: int, bidirectional: bool, batch_first: bool):
        super().__init__()
        cls, extra = {"lstm": (nn.LSTM, {}), "gru": (nn.GRU, {}), "rnn_tanh": (nn.RNN, {}),
                      "rnn_relu": (nn.RNN, {"nonlinearity": "relu"})}[kind]
        self.batch_first = batch_first
        self.rnn = cls(D, 4, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, **extra)
        width = 4 * (2 if bidirectional else 1)
        self.head = nn.Linear(width + 4, 3)

    def forward(self, x):
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        h = state[0] if isinstance(state, tuple) else state        # (layers * directions, B, 4)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(torch.cat([last, h[-1]], dim=1))


RNN_CASES = [("lstm", 1, False, True), ("lstm", 2, True, False), ("lstm", 2, False, True), ("lstm", 1, True, True),
             ("gru", 1, False, False), ("gru", 2, True, True), ("rnn_tanh", 2, True, False),
             ("rnn_relu", 1, False, True)]


class PackedLSTM(nn.Module):
    """An LSTM fed a PackedSequence of each sample's own length: forward(x [B, T, D], lengths [B])."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(D, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


# ---------------------------------------------------------------- the other layer types
class Parametrized(nn.Module):
    """weight_norm on a Linear and a Conv2d, spectral_norm on a Linear (eval mode: no power iteration)."""

    def __init__(self):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv2d(2, 3, 3))
        self.lin = parametrizations.weight_norm(nn.Linear(3, 5), dim=0)
        self.head = parametrizations.spectral_norm(nn.Linear(5, 3))

    def forward(self, x):
        return self.head(torch.tanh(self.lin(self.conv(x).mean(dim=(2, 3)))))


def parametrized():
    model = Parametrized()
    model.train()
    with torch.no_grad():
        for _ in range(3):      # spectral_norm's power iteration, as training would run it
            model.head.parametrizations.weight[0](model.head.parametrizations.weight.original)
    return model


class PReLUNet(nn.Module):
    """PReLU with one slope and with one per channel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.act = nn.PReLU(3, init=0.1)
        self.lin = nn.Linear(3, 4)
        self.act2 = nn.PReLU(init=0.3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act2(self.lin(self.act(self.conv(x)).mean(dim=(2, 3)))))


class InstanceNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.InstanceNorm2d(3, affine=True)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class ConvTransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        self.up_groups = nn.ConvTranspose2d(3, 3, 2, groups=3, bias=False)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.up_groups(torch.tanh(self.up(x)))).mean(dim=(2, 3)))


class BagNet(nn.Module):
    """EmbeddingBag over each sample's row of ids [B, L]: mode mean, and mode sum skipping padding."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 6, mode="mean")
        self.summed = nn.EmbeddingBag(VOCAB, 6, mode="sum", padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.bag(ids) + 0.5 * self.summed(ids)))


class WeightedBag(nn.Module):
    """EmbeddingBag with per_sample_weights (a second batched operand)."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 6, mode="sum")
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        weights = (ids > 0).to(self.bag.weight.dtype) * 0.5
        return self.head(torch.tanh(self.bag(ids, per_sample_weights=weights)))


class HFConv1DNet(nn.Module):
    """GPT-2's Conv1D (torch.addmm(bias, x.view(-1, d), weight)) on [B, T, D]."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.attn_proj = Conv1D(8, D)
        self.out = Conv1D(3, 8)

    def forward(self, x):
        return self.out(torch.tanh(self.attn_proj(x))).mean(1)


class KeywordLinear(nn.Module):
    """Linear layers called as self.lin(input=x)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(input=torch.tanh(self.lin(input=x))).mean(1)


def _images(channels, size):
    return _vectors(B, channels, size, size)


# name -> (model factory, input maker): every parameter type the hooks backend scores by rules
MODELS = {
    "mha_batch_first": (lambda: SelfAttention(batch_first=True), lambda: _tokens(B)),
    "mha_sequence_first": (lambda: SelfAttention(batch_first=False), lambda: _tokens(B)),
    "mha_kdim_vdim": (CrossAttention, _vectors(B, T, D)),
    "mha_cross_packed": (lambda: CrossAttention(kdim=8, vdim=8), _vectors(B, T, D)),
    "swin": (swin, _images(3, 16)),
    "convnext": (convnext, _images(3, 16)),
    "vit": (vit, _images(3, 16)),
    **{f"{kind}_{layers}layer{'_bi' if bi else ''}{'_batch_first' if bf else ''}":
       ((lambda kind=kind, layers=layers, bi=bi, bf=bf: Recurrent(kind, layers, bi, bf)), _vectors(B, T, D))
       for kind, layers, bi, bf in RNN_CASES},
    "parametrizations": (parametrized, _images(2, 5)),
    "prelu": (PReLUNet, _images(2, 5)),
    "instance_norm": (InstanceNormNet, _images(2, 5)),
    "conv_transpose": (ConvTransposeNet, _images(2, 3)),
    "embedding_bag": (BagNet, lambda: _tokens(B)),
    "hf_conv1d": (HFConv1DNet, _vectors(B, T, D)),
    "keyword_linear": (KeywordLinear, _vectors(B, T, D)),
}
FLOAT32 = ["mha_batch_first", "mha_kdim_vdim", "swin", "convnext", "vit", "lstm_2layer_bi", "gru_2layer_bi_batch_first",
           "parametrizations", "embedding_bag", "hf_conv1d"]


def _build(name: str, dtype=torch.float64):
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    model = factory().to(dtype)
    x = make_input()
    return model, (x.to(dtype) if x.is_floating_point() else x)


def _scores(model, batches, backend, **kw):
    return score_pool(model, batches, backend=backend, progress=False, **kw)


def _assert_no_fallback(model, batch):
    report = explain(model, batch)
    assert report.fallback == [], str(report)
    assert report.by("unused") == [], str(report)
    return report


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_is_scored_by_rules_and_matches_the_loop_in_float64(name):
    """No parameter left to the fallback (nor unreached), and the rules' norms are the per-sample
    loop's to 1e-9 in float64: the recording follows the samples through every op of the model."""
    model, x = _build(name)
    _assert_no_fallback(model, x)
    hooks, loop = _scores(model, [x], "hooks"), _scores(model, [x], "loop")
    assert float(loop.min()) > 0
    torch.testing.assert_close(hooks, loop, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", FLOAT32)
def test_float32_matches_the_float64_loop(name):
    """float32 models are scored by the same rules (no fallback), within 1e-4 of the float64 loop
    (the unrolled RNNs round differently from the fused kernel, by about 1e-7)."""
    model, x = _build(name, torch.float32)
    _assert_no_fallback(model, x)
    got = _scores(model, [x], "hooks")
    assert got.dtype == torch.float32
    err = max_rel_err(got, reference_scores(model, x))
    assert err <= 1e-4, (name, err)


@pytest.mark.parametrize("name", ["lstm_2layer_bi", "mha_batch_first", "mha_sequence_first",
                                  "gru_2layer_bi_batch_first"])
def test_chunks_of_two_score_as_the_whole_pool(name):
    """A sample's score does not depend on its chunk: chunks of 2 (and a last one of 1, which must
    not fall back either: the module's filter turns a FallbackShareWarning into an error) score as
    one pass over the pool, and both as the loop."""
    model, x = _build(name)
    x = torch.cat([x, x.flip(0)[:3]])      # 7 samples: chunks 2, 2, 2, 1
    whole = _scores(model, [x], "hooks")
    torch.testing.assert_close(_scores(model, [x], "hooks", chunk_size=2), whole, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(whole, _scores(model, [x], "loop"), rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")   # vmap over the fallback's ops
def test_a_packed_sequence_lstm_is_scored_exactly_by_the_fallback_and_explain_says_why():
    """The unrolling takes padded tensors only: torch.lstm's PackedSequence form goes to the exact
    fallback, and explain says so; the head after it reads the packed state, whose rows the
    recording cannot follow, and is named with the op where the layout was lost."""
    torch.manual_seed(0)
    model = PackedLSTM().double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    lengths = torch.tensor([T, 2, 4, 3])
    batch = (x, lengths)
    report = explain(model, batch, num_inputs=2)
    rnn = {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"}
    assert {p.name for p in report.fallback} == rnn | {"head.weight", "head.bias"}, str(report)
    assert all("lstm: a PackedSequence input" in report[n].reason for n in rnn), str(report)
    assert "lost at `lstm`" in report["head.weight"].reason, str(report)
    with pytest.warns(FallbackShareWarning, match="rnn.weight_ih_l0"):
        hooks = _scores(model, [batch], "hooks", num_inputs=2)
    torch.testing.assert_close(hooks, _scores(model, [batch], "loop", num_inputs=2), rtol=1e-9, atol=1e-12)
    # each sample scores as it does alone, at its own length
    alone = torch.cat([_scores(model, [(x[i:i + 1, :n], lengths[i:i + 1])], "loop", num_inputs=2)
                       for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(hooks, alone, rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_embedding_bag_with_per_sample_weights_is_scored_exactly_by_the_fallback():
    """per_sample_weights make the bag a second batched operand, which the EmbeddingBag rule does not
    read: the table goes to the exact fallback, with explain naming the op."""
    model, x = WeightedBag().double(), _tokens(B)
    report = explain(model, x)
    assert "bag.weight" in {p.name for p in report.fallback}, str(report)
    assert "embedding_bag" in report["bag.weight"].reason, str(report)
    with pytest.warns(FallbackShareWarning, match="bag.weight"):
        hooks = _scores(model, [x], "hooks")
    torch.testing.assert_close(hooks, _scores(model, [x], "loop"), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["mha_batch_first", "mha_kdim_vdim", "vit", "lstm_2layer_bi"])
def test_a_single_sample_is_scored_by_rules(name):
    """A chunk of one sample (the last of a pool, or one sample scored alone): with B = 1 every dim
    could hold the batch, and the attention's head split used to send out_proj and everything
    after it to the fallback."""
    model, x = _build(name)
    _assert_no_fallback(model, x[:1])
    torch.testing.assert_close(_scores(model, [x[:1]], "hooks"), _scores(model, [x[:1]], "loop"),
                               rtol=1e-9, atol=1e-12)
