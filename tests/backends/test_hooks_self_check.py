"""The hooks backend's self-check against the per-sample loop runs on every new chunk shape, not
only on the first chunk: a later chunk may be the one whose size equals a sequence length."""
import pytest
import torch

from gradnorm_engine import score_pool
from gradnorm_engine.backends.hooks import HooksFallbackWarning
from tests.backends.test_hooks import ReadsTheBatchSize   # batched != per-sample when T == B


def test_a_later_chunk_whose_size_is_the_sequence_length_is_checked_and_scored_exactly():
    torch.manual_seed(0)
    model = ReadsTheBatchSize().double()
    x = torch.randint(0, 11, (7, 3), generator=torch.Generator().manual_seed(1))   # T = 3
    # chunks of 4, 3: the first (B=4 != T) is the per-sample forward; the second has B == T, and only
    # the check against the loop can tell that the batched forward is not
    with pytest.warns(HooksFallbackWarning, match="disagree with the per-sample loop"):
        hooks = score_pool(model, [x], backend="hooks", chunk_size=4, progress=False)
    loop = score_pool(model, [x], backend="loop", chunk_size=4, progress=False)
    torch.testing.assert_close(hooks, loop, rtol=1e-9, atol=1e-12)
