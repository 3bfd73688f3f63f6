"""small-text adapter: PoolBasedActiveLearner.query with GradNormSampling labels the unlabeled texts
with the largest gradient norms, for small-text's own PyTorch classifier (KimCNN) and its
transformers classifier (a small BERT saved to a folder: no download)."""
import numpy as np
import pytest
import torch

pytest.importorskip("small_text")

from small_text import PoolBasedActiveLearner  # noqa: E402
from small_text.integrations.pytorch.classifiers import KimCNNFactory  # noqa: E402
from small_text.integrations.pytorch.datasets import PytorchTextClassificationDataset  # noqa: E402

from small_text.integrations.pytorch.utils.data import dataloader  # noqa: E402

from gradnorm_engine import badge, expected_gradient_length, score_pool, top_k  # noqa: E402
from gradnorm_engine.integrations.smalltext import (  # noqa: E402
    BadgeSampling, ExpectedGradientLengthSampling, GradNormSampling)

VOCAB = 40
MAX_LEN = 12
N_QUERY = 6


class Vocabulary:
    """What small-text's PyTorch datasets read of a vocabulary: its size."""

    def __len__(self) -> int:
        return VOCAB


def texts(n: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        # class 1 texts lean to the upper half of the vocabulary: a signal to learn
        low = 1 + 15 * label
        out.append((torch.tensor(rng.integers(low, low + 24, size=rng.integers(3, MAX_LEN))), label))
    return out


def entropy_gradnorm(model, inputs: dict) -> float:
    """|| d H / d theta || of one sample, by one backward (the reference, as the public code does)."""
    logits = model(**inputs)
    logits = getattr(logits, "logits", logits)
    logp = logits.log_softmax(-1)
    h = -(logp.exp() * logp).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(h, params, allow_unused=True)
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None)))


def expected_picks(scores: list[float], unlabeled: np.ndarray, n: int) -> np.ndarray:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]
    return unlabeled[order]


def test_kimcnn_learner_queries_the_largest_gradient_norms():
    torch.manual_seed(0)
    data = PytorchTextClassificationDataset(texts(60), Vocabulary(), target_labels=np.array([0, 1]))
    factory = KimCNNFactory("kimcnn", 2, {"embedding_matrix": torch.randn(VOCAB, 8), "num_epochs": 2,
                                          "device": "cpu", "kernel_heights": [2, 3], "out_channels": 4,
                                          "max_seq_len": MAX_LEN, "mini_batch_size": 8})
    strategy = GradNormSampling(batch_size=7)
    learner = PoolBasedActiveLearner(factory, strategy, data)
    initial = np.arange(10)
    learner.initialize_data(initial, data.y[initial])
    for _ in range(2):
        clf = learner.classifier
        clf.model.eval()
        unlabeled = np.setdiff1d(np.arange(len(data)), learner.indices_labeled)
        collate = clf._create_collate_fn()
        want = [entropy_gradnorm(clf.model, {"x": collate([data.data[i]])[0]}) for i in unlabeled]
        picked = learner.query(num_samples=N_QUERY)
        np.testing.assert_array_equal(picked, expected_picks(want, unlabeled, N_QUERY))
        np.testing.assert_allclose(strategy.scores_, want, rtol=1e-4)
        learner.update(data.y[picked])


def _bert_learner(tmp_path, strategy):
    """A small-text transformers learner around a small BERT saved to ``tmp_path``, initialised on
    8 texts. -> (learner, data, rows: (input_ids, attention_mask, label) per text)"""
    transformers = pytest.importorskip("transformers")
    from small_text.integrations.transformers.classifiers import TransformerBasedClassificationFactory
    from small_text.integrations.transformers.classifiers.classification import TransformerModelArguments
    from small_text.integrations.transformers.datasets import TransformersDataset

    # A small BERT and its word-piece vocabulary saved to a folder, read back by small-text.
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)

    rows = []
    for tokens, label in texts(30, seed=1):
        enc = tokenizer(" ".join(f"w{int(t)}" for t in tokens), padding="max_length", max_length=MAX_LEN + 2,
                        truncation=True, return_tensors="pt")
        rows.append((enc["input_ids"], enc["attention_mask"], label))
    data = TransformersDataset(rows, target_labels=np.array([0, 1]))
    factory = TransformerBasedClassificationFactory(TransformerModelArguments(str(tmp_path)), 2,
                                                    kwargs={"num_epochs": 1, "mini_batch_size": 8, "device": "cpu"})
    learner = PoolBasedActiveLearner(factory, strategy, data)
    initial = np.arange(8)
    torch.manual_seed(0)   # small-text's training draws from the global generators
    np.random.seed(0)
    learner.initialize_data(initial, data.y[initial])
    return learner, data, rows


def test_transformers_learner_passes_ids_and_mask_by_name(tmp_path):
    strategy = GradNormSampling(batch_size=5)
    learner, data, rows = _bert_learner(tmp_path, strategy)
    clf = learner.classifier
    clf.model.eval()
    unlabeled = np.setdiff1d(np.arange(len(data)), learner.indices_labeled)
    want = [entropy_gradnorm(clf.model, {"input_ids": rows[i][0], "attention_mask": rows[i][1]}) for i in unlabeled]
    # the engine on the same pool, batched as the strategy batches it: the picks must be its top-k
    pool = [{"input_ids": torch.cat([rows[i][0] for i in unlabeled]),
             "attention_mask": torch.cat([rows[i][1] for i in unlabeled])}]
    engine = score_pool(clf.model, pool, chunk_size=5, progress=False)
    picked = learner.query(num_samples=N_QUERY)
    np.testing.assert_array_equal(picked, expected_picks(engine.tolist(), unlabeled, N_QUERY))
    # float32: a batched forward rounds differently from a batch of one (up to ~3e-4 seen here)
    np.testing.assert_allclose(strategy.scores_, want, rtol=1e-3)


def test_transformers_learner_with_egl_and_badge(tmp_path):
    """The transformers classifier's ids and masks reach EGL and BADGE by name; BADGE's layer is
    the classifier head (the model's last nn.Linear), whose output is the logits."""
    def batches(rows, unlabeled, size=5):
        for start in range(0, len(unlabeled), size):
            chunk = [rows[i] for i in unlabeled[start:start + size]]
            yield {"input_ids": torch.cat([r[0] for r in chunk]), "attention_mask": torch.cat([r[1] for r in chunk])}

    for strategy in (ExpectedGradientLengthSampling(batch_size=5), BadgeSampling(batch_size=5, seed=2)):
        learner, data, rows = _bert_learner(tmp_path, strategy)
        model = learner.classifier.model
        unlabeled = np.setdiff1d(np.arange(len(data)), learner.indices_labeled)
        pool = list(batches(rows, unlabeled))
        if isinstance(strategy, BadgeSampling):
            want = badge(model, pool, N_QUERY, generator=torch.Generator().manual_seed(2), progress=False)
        else:
            want = top_k(expected_gradient_length(model, pool, progress=False), N_QUERY).indices
        np.testing.assert_array_equal(learner.query(num_samples=N_QUERY), unlabeled[want.numpy()])


def test_a_classifier_without_a_model_is_refused():
    class Untrained:
        model = None

    data = PytorchTextClassificationDataset(texts(5), Vocabulary(), target_labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="holds no torch model"):
        GradNormSampling().query(Untrained(), data, np.arange(5), np.arange(0), np.array([]), n=2)


def _kimcnn_learner(strategy):
    torch.manual_seed(0)
    data = PytorchTextClassificationDataset(texts(60), Vocabulary(), target_labels=np.array([0, 1]))
    factory = KimCNNFactory("kimcnn", 2, {"embedding_matrix": torch.randn(VOCAB, 8), "num_epochs": 2,
                                          "device": "cpu", "kernel_heights": [2, 3], "out_channels": 4,
                                          "max_seq_len": MAX_LEN, "mini_batch_size": 8})
    learner = PoolBasedActiveLearner(factory, strategy, data)
    initial = np.arange(10)
    learner.initialize_data(initial, data.y[initial])
    return learner, data


def _two_kimcnn_rounds(strategy, expected_positions):
    """Two query/update rounds of a KimCNN learner; each query must return
    unlabeled[expected_positions(model, loader of the unlabeled texts)]."""
    learner, data = _kimcnn_learner(strategy)
    for _ in range(2):
        clf = learner.classifier
        unlabeled = np.setdiff1d(np.arange(len(data)), learner.indices_labeled)
        loader = dataloader(data[unlabeled].data, 5, clf._create_collate_fn(), train=False)
        expected = unlabeled[expected_positions(clf.model, loader)]
        picked = learner.query(num_samples=N_QUERY)
        np.testing.assert_array_equal(picked, expected)
        learner.update(data.y[picked])
    assert len(learner.indices_labeled) == 10 + 2 * N_QUERY


def test_kimcnn_learner_queries_the_largest_expected_gradient_lengths():
    strategy = ExpectedGradientLengthSampling(batch_size=7, top_m=2, norm="tensor_sum")

    def expected(model, loader):
        egl = expected_gradient_length(model, loader, top_m=2, norm="tensor_sum", progress=False)
        return top_k(egl, N_QUERY).indices.numpy()

    _two_kimcnn_rounds(strategy, expected)
    assert strategy.scores_.shape == (60 - 10 - N_QUERY,)


def test_kimcnn_learner_queries_badges_picks():
    strategy = BadgeSampling(seed=4, batch_size=7)

    def expected(model, loader):
        return badge(model, loader, N_QUERY, generator=torch.Generator().manual_seed(4), progress=False).numpy()

    _two_kimcnn_rounds(strategy, expected)
    assert strategy.scores_.shape == (N_QUERY,) and (strategy.scores_ > 0).all()   # ||g|| of each pick
    with pytest.raises(TypeError, match="seed"):
        BadgeSampling(seed="4")
