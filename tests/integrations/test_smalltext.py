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

from gradnorm_engine.integrations.smalltext import GradNormSampling  # noqa: E402

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


def test_transformers_learner_passes_ids_and_mask_by_name(tmp_path):
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
    strategy = GradNormSampling(batch_size=5)
    learner = PoolBasedActiveLearner(factory, strategy, data)
    initial = np.arange(8)
    learner.initialize_data(initial, data.y[initial])
    clf = learner.classifier
    clf.model.eval()
    unlabeled = np.setdiff1d(np.arange(len(data)), learner.indices_labeled)
    want = [entropy_gradnorm(clf.model, {"input_ids": rows[i][0], "attention_mask": rows[i][1]}) for i in unlabeled]
    picked = learner.query(num_samples=N_QUERY)
    np.testing.assert_array_equal(picked, expected_picks(want, unlabeled, N_QUERY))
    np.testing.assert_allclose(strategy.scores_, want, rtol=1e-4)


def test_a_classifier_without_a_model_is_refused():
    class Untrained:
        model = None

    data = PytorchTextClassificationDataset(texts(5), Vocabulary(), target_labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="holds no torch model"):
        GradNormSampling().query(Untrained(), data, np.arange(5), np.arange(0), np.array([]), n=2)
