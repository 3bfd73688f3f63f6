"""Each strategy picks `budget` distinct subset members, by the score it claims to use."""
import pytest
import torch

from gradnorm_engine import score_pool
from gradnorm_engine.al.datasets import load_digits
from gradnorm_engine.errors import UsageError
from gradnorm_engine.al.lossnet import lossnet_for
from gradnorm_engine.al.models import cifar_resnet18
from gradnorm_engine.scores import entropy
from gradnorm_engine.al.strategies import STRATEGIES, QueryContext, make_strategy
from gradnorm_engine.al.strategies.coreset import k_center_greedy, min_distances


pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
BUDGET = 5


@pytest.fixture(scope="module")
def context():
    data = load_digits()
    torch.manual_seed(0)
    model = cifar_resnet18(num_classes=10, in_channels=1, width=4)
    # a few steps of training so the BatchNorm statistics and scores are not degenerate
    from gradnorm_engine.al.trainer import TrainConfig, train
    lossnet = lossnet_for(model, data.train.batch(torch.tensor([0]), "cpu")[0])
    train(model, data.train, torch.arange(40), TrainConfig(epochs=2, lr=0.05, batch_size=20, progress=False),
          device=CPU, lossnet=lossnet, generator=torch.Generator().manual_seed(0))
    subset = torch.arange(100, 160)
    return QueryContext(model=model, data=data.train, labeled=torch.arange(40), subset=subset, device=CPU,
                        lossnet=lossnet, generator=torch.Generator().manual_seed(1), batch_size=16)


def test_registry_holds_the_strategies_and_their_training_needs():
    assert set(STRATEGIES) == {"lplgrad", "ent-gradnorm", "learning-loss", "entropy", "coreset", "random", "egl",
                                "badge"}
    needs = {name: cls.uses_lossnet for name, cls in STRATEGIES.items()}
    assert needs == {"lplgrad": True, "learning-loss": True, "ent-gradnorm": False, "entropy": False,
                     "coreset": False, "random": False, "egl": False, "badge": False}
    with pytest.raises(UsageError, match="unknown strategy 'bald'"):
        make_strategy("bald")


def test_an_option_a_strategy_does_not_take_is_refused_with_the_ones_it_takes():
    with pytest.raises(UsageError, match="strategy 'lplgrad' has no option 'nrom'; it takes norm, backend, score"):
        make_strategy("lplgrad", nrom="frobenius")
    with pytest.raises(UsageError, match="strategy 'random' has no option 'norm'; it takes no options"):
        make_strategy("random", norm="frobenius")
    assert make_strategy("ent-gradnorm", norm="frobenius").norm == "frobenius"


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_picks_budget_distinct_subset_members(context, name):
    picked = make_strategy(name).select(context, BUDGET)
    assert picked.dtype == torch.int64 and picked.shape == (BUDGET,)
    assert picked.unique().numel() == BUDGET
    assert torch.isin(picked, context.subset).all()


def _top(context, scores, k=BUDGET):
    return context.subset[torch.sort(-scores, stable=True).indices[:k]]


@pytest.mark.parametrize("name", ["lplgrad", "ent-gradnorm"])
@pytest.mark.parametrize("norm", ["tensor_sum", "frobenius"])
def test_gradnorm_strategies_rank_by_the_per_sample_loop(context, name, norm):
    strategy = make_strategy(name) if norm == "tensor_sum" else make_strategy(name, norm=norm)
    assert strategy.norm == norm
    picked = strategy.select(context, BUDGET)
    reference = score_pool(context.model, context.loader(context.subset), backend="loop", norm=norm, progress=False)
    assert torch.equal(picked, _top(context, reference))
    assert strategy.last_backend is not None


def test_entropy_picks_the_largest_entropies(context):
    scores = entropy(context.logits(context.subset))
    assert torch.equal(make_strategy("entropy").select(context, BUDGET), _top(context, scores))


def test_learning_loss_picks_the_largest_predicted_losses(context):
    scores = context.predicted_losses(context.subset)
    assert scores.shape == (context.subset.numel(),)
    assert torch.equal(make_strategy("learning-loss").select(context, BUDGET), _top(context, scores))


def test_random_is_reproducible_from_the_generator(context):
    a = make_strategy("random").select(QueryContext(**{**context.__dict__, "generator": torch.Generator().manual_seed(3)}), BUDGET)
    b = make_strategy("random").select(QueryContext(**{**context.__dict__, "generator": torch.Generator().manual_seed(3)}), BUDGET)
    assert torch.equal(a, b)


def test_min_distances_matches_the_full_matrix():
    points, centers = torch.randn(50, 6), torch.randn(37, 6)
    torch.testing.assert_close(min_distances(points, centers, block=8), torch.cdist(points, centers).min(dim=1).values)


def _k_center_reference(points, centers, k):
    """Plain greedy k-center with the full distance matrix (small sizes only)."""
    chosen = []
    for _ in range(k):
        all_centers = torch.cat([centers, points[chosen]]) if chosen else centers
        d = torch.cdist(points, all_centers).min(dim=1).values
        d[chosen] = -1
        chosen.append(int(torch.argmax(d)))
    return chosen


def test_k_center_greedy_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    points, centers = torch.randn(40, 3, generator=g), torch.randn(10, 3, generator=g)
    assert k_center_greedy(points, centers, 8).tolist() == _k_center_reference(points, centers, 8)


def test_k_center_greedy_first_pick_is_farthest_from_the_labeled_set():
    centers = torch.zeros(1, 2)
    points = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 2.0], [-4.9, 0.0]])
    picked = k_center_greedy(points, centers, 2).tolist()
    assert picked == [1, 3]


def test_coreset_uses_penultimate_embeddings(context):
    points = context.embeddings(context.subset)
    assert points.shape == (context.subset.numel(), 32)  # width 4 -> 8 * 4 channels
    centers = context.embeddings(context.labeled)
    expected = context.subset[k_center_greedy(points, centers, BUDGET)]
    assert torch.equal(make_strategy("coreset").select(context, BUDGET), expected)


def test_a_diverged_model_gets_a_named_error_from_every_score_based_strategy(context):
    """NaN weights: coreset's distances and the entropy / loss scores are undefined; each says so
    instead of picking a sample twice or dropping it."""
    import copy

    broken = copy.deepcopy(context.model)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    nan_context = QueryContext(**{**context.__dict__, "model": broken})
    for name in ("coreset", "entropy", "ent-gradnorm"):
        with pytest.raises(ValueError, match="NaN"):
            make_strategy(name).select(nan_context, BUDGET)


def test_badge_picks_kmeans_pp_seeds_of_the_subsets_gradient_embeddings(context):
    from gradnorm_engine.badge import kmeans_pp_gradient_embeddings, last_layer_features

    h, p = last_layer_features(context.model, context.loader(context.subset), progress=False)
    want = context.subset[kmeans_pp_gradient_embeddings(h, p, BUDGET, torch.Generator().manual_seed(5))]
    picked = make_strategy("badge").select(QueryContext(**{**context.__dict__,
                                                          "generator": torch.Generator().manual_seed(5)}), BUDGET)
    assert torch.equal(picked, want)


def test_egl_picks_the_largest_expected_gradient_lengths(context):
    from gradnorm_engine import expected_gradient_length

    scores = expected_gradient_length(context.model, context.loader(context.subset), norm="tensor_sum",
                                      progress=False)
    assert torch.equal(make_strategy("egl").select(context, BUDGET), _top(context, scores))
