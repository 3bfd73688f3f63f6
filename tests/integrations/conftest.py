"""Small data and models for the adapter tests: sklearn's 8x8 digits (shipped with
scikit-learn, no download) and networks of a few thousand parameters."""
import numpy as np
import pytest
from torch import nn

POOL_SIZE = 300


@pytest.fixture(scope="session")
def digits():
    """X float32 [300, 64] in [0, 1], y int64 [300]."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    return (X[:POOL_SIZE] / 16.0).astype(np.float32), y[:POOL_SIZE].astype(np.int64)


class DigitsMLP(nn.Module):
    """64 -> 32 -> 10 logits; what a skorch user would wrap."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.net(x)


class DigitsCNN(nn.Module):
    """[B, 1, 8, 8] -> logits [B, 10] (and the embedding, when ``with_embedding``, as DeepAL's nets)."""

    def __init__(self, with_embedding: bool = False):
        super().__init__()
        self.with_embedding = with_embedding
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 8, 4, 4)
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten())     # (B, 256)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        emb = self.features(x)
        logits = self.head(emb)
        return (logits, emb) if self.with_embedding else logits


@pytest.fixture(scope="session")
def mlp_class():
    return DigitsMLP


@pytest.fixture(scope="session")
def cnn_class():
    return DigitsCNN
