"""Models a backend cannot run: one line naming the problem and the backend (or setting) that works."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradnorm_engine import score_pool

BACKENDS = ("auto", "hooks", "vmap", "loop")


class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool):
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.use_reentrant = use_reentrant

    def _block(self, h):
        return torch.tanh(self.block(h))

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.head(checkpoint(self._block, h, use_reentrant=self.use_reentrant))


class ReadsAValue(nn.Module):
    """Python control flow on a tensor's value, as Hugging Face's masking utilities do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        if bool((x.abs() > 1e9).any()):
            x = x.clamp(-1e9, 1e9)
        return self.lin(x)


def _scores(model, x, backend):
    return score_pool(model, [x], backend=backend, progress=False)


@pytest.mark.parametrize("kind", [nn.GRU, nn.RNN, nn.LSTM])
def test_vmap_on_a_recurrent_layer_names_it_and_auto_scores_it(kind):
    torch.manual_seed(0)
    model, x = Recurrent(kind), torch.randn(5, 7, 4)
    want = _scores(model, x, "loop")
    for backend in ("auto", "hooks"):
        torch.testing.assert_close(_scores(model, x, backend), want, rtol=1e-5, atol=1e-7)
    try:   # torch.func batches some of them (LSTM on the CPU) and not others (GRU, RNN; cuDNN)
        got = _scores(model, x, "vmap")
    except RuntimeError as err:
        message = str(err)
        assert message.startswith(f"backend='vmap' cannot run this model's nn.{kind.__name__}") and "\n" not in message
        assert "backend='auto' or 'hooks'" in message
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_vmap_on_a_checkpointed_model_names_the_checkpoint_and_auto_scores_it():
    torch.manual_seed(0)
    model, x = Checkpointed(use_reentrant=False), torch.randn(5, 4)
    want = _scores(model, x, "loop")
    for backend in ("auto", "hooks"):
        torch.testing.assert_close(_scores(model, x, backend), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"^backend='vmap' cannot run this model: it uses torch.utils.checkpoint.*"
                                           r"backend='auto' or 'hooks'") as info:
        _scores(model, x, "vmap")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reentrant_checkpoint_is_refused_in_every_backend_with_the_fix(backend):
    """use_reentrant=True runs its backward only under .backward(), not torch.autograd.grad."""
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match=r"^the model uses torch.utils.checkpoint with use_reentrant=True.*"
                                           r"pass use_reentrant=False") as info:
        _scores(Checkpointed(use_reentrant=True), torch.randn(5, 4), backend)
    assert "\n" not in str(info.value)


def test_vmap_on_a_forward_that_reads_a_tensor_value_says_so():
    torch.manual_seed(0)
    model, x = ReadsAValue(), torch.randn(5, 4)
    want = _scores(model, x, "loop")
    torch.testing.assert_close(_scores(model, x, "auto"), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"^backend='vmap' cannot run this model: its forward reads a tensor's "
                                           r"value.*backend='auto' or 'hooks'") as info:
        _scores(model, x, "vmap")
    assert "\n" not in str(info.value)


def test_vmap_on_a_hugging_face_model_with_an_attention_mask_says_so():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    batch = {"input_ids": torch.randint(0, 30, (3, 6)),
             "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3])}
    want = score_pool(model, [batch], backend="loop", progress=False)
    torch.testing.assert_close(score_pool(model, [batch], progress=False), want, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match=r"^backend='vmap' cannot run this model: .*Hugging Face.*attention mask.*"
                                           r"backend='auto' or 'hooks'") as info:
        score_pool(model, [batch], backend="vmap", progress=False)
    assert "\n" not in str(info.value)
