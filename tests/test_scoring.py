"""scoring.py: the single-process stream's own refusals."""
import pytest
import torch
from torch import nn

from gradnorm_engine import rank_unlabeled, score_pool
from gradnorm_engine.backends import BACKENDS
from gradnorm_engine.errors import ZeroScoreWarning


class FirstOutputIsNotTheLogits(nn.Module):
    """Returns (a function of the input alone, the logits): the engine scores a tuple's first element."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return x[:, :3] * 2, self.lin(x)


class DetachedLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).detach()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("model_cls", [FirstOutputIsNotTheLogits, DetachedLogits])
def test_a_score_that_no_measured_parameter_reaches_is_warned_about(model_cls, backend):
    """Every score is 0 and the ranking the pool order: ranked without a word before."""
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    with pytest.warns(ZeroScoreWarning, match="does not depend on any measured parameter") as record:
        res = rank_unlabeled(model_cls(), [x], 2, backend=backend, progress=False)
    assert torch.equal(res.scores, torch.zeros(2)) and res.indices.tolist() == [0, 1]
    found = [w for w in record if issubclass(w.category, ZeroScoreWarning)]
    assert len(found) == 1 and found[0].filename == __file__ and "logits_fn=" in str(found[0].message)


def test_params_naming_only_unused_parameters_are_warned_about_and_the_logits_fn_fixes_a_tuple():
    torch.manual_seed(0)
    model, x = FirstOutputIsNotTheLogits(), torch.randn(5, 4)
    scores = score_pool(model, [x], logits_fn=lambda out: out[1], progress=False)
    assert scores.shape == (5,) and bool((scores > 0).all())

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x)

    with pytest.warns(ZeroScoreWarning, match="other params="):
        assert torch.equal(score_pool(WithUnused(), [x], params=["unused.weight"], progress=False), torch.zeros(5))
