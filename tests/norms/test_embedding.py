"""norms/embedding.py: the Embedding rule with repeated tokens, padding_idx and scale_grad_by_freq."""
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from gradnorm_engine.testing import check_rule


@settings(max_examples=20, deadline=None)
@given(vocab=st.integers(1, 6), dim=st.integers(1, 4), seq=st.lists(st.integers(1, 5), min_size=0, max_size=2),
       batch=st.sampled_from([1, 2, 3, 5]), padding=st.booleans(), scale=st.booleans(), seed=st.integers(0, 2**16))
def test_embedding_rule_matches_per_sample_loop(vocab, dim, seq, batch, padding, scale, seed):
    torch.manual_seed(seed)
    layer = nn.Embedding(vocab, dim, padding_idx=(vocab - 1 if padding else None), scale_grad_by_freq=scale)
    tokens = torch.randint(0, vocab, (batch, *seq))   # small vocabularies: many repeats
    check_rule(layer, tokens)


def test_large_vocabulary_costs_nothing_extra():
    layer = nn.Embedding(1_000_000, 3)
    check_rule(layer, torch.tensor([[5, 999_999, 5], [0, 0, 1]]), dtype=torch.float32)
