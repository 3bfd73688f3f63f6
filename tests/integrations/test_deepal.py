"""DeepAL adapter: GradNormSampling.query(n) returns rank_unlabeled's top-n as dataset indices.

DeepAL is a codebase, not a package, so its Data / Net / handler are mirrored here in
miniature: the interfaces the strategy relies on, nothing more.
"""
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradnorm_engine import rank_unlabeled
from gradnorm_engine.integrations.deepal import GradNormSampling

N_QUERY = 7


class Handler(Dataset):
    """DeepAL's handlers yield (x, y, index)."""

    def __init__(self, X, Y):
        self.X, self.Y = X, Y

    def __getitem__(self, index):
        return self.X[index], self.Y[index], index

    def __len__(self):
        return len(self.X)


class Data:
    def __init__(self, X_train, Y_train, handler):
        self.X_train, self.Y_train, self.handler = X_train, Y_train, handler
        self.n_pool = len(X_train)
        self.labeled_idxs = np.zeros(self.n_pool, dtype=bool)

    def initialize_labels(self, num):
        self.labeled_idxs[np.random.default_rng(0).permutation(self.n_pool)[:num]] = True

    def get_labeled_data(self):
        idxs = np.arange(self.n_pool)[self.labeled_idxs]
        return idxs, self.handler(self.X_train[idxs], self.Y_train[idxs])

    def get_unlabeled_data(self):
        idxs = np.arange(self.n_pool)[~self.labeled_idxs]
        return idxs, self.handler(self.X_train[idxs], self.Y_train[idxs])


class Net:
    """DeepAL's Net: train() builds a fresh ``self.clf``; the nets return (logits, embedding)."""

    def __init__(self, net, params, device="cpu"):
        self.net, self.params, self.device = net, params, device

    def train(self, data):
        self.clf = self.net().to(self.device)
        optimizer = torch.optim.SGD(self.clf.parameters(), lr=0.1)
        for _ in range(self.params["n_epoch"]):
            for x, y, _ in DataLoader(data, shuffle=True, **self.params["train_args"]):
                optimizer.zero_grad()
                out, _ = self.clf(x)
                nn.functional.cross_entropy(out, y).backward()
                optimizer.step()


def test_two_query_rounds_pick_the_largest_gradient_norms(digits, cnn_class):
    X, y = digits
    dataset = Data(torch.from_numpy(X).reshape(-1, 1, 8, 8), torch.from_numpy(y), Handler)
    dataset.initialize_labels(20)
    net = Net(lambda: cnn_class(with_embedding=True),
              {"n_epoch": 2, "train_args": {"batch_size": 32}, "test_args": {"batch_size": 64}})
    strategy = GradNormSampling(dataset, net)
    strategy.train()
    for _ in range(2):
        unlabeled_idxs, unlabeled_data = dataset.get_unlabeled_data()
        expected = rank_unlabeled(net.clf, DataLoader(unlabeled_data, batch_size=19), N_QUERY, progress=False)
        query_idxs = strategy.query(N_QUERY)
        np.testing.assert_array_equal(query_idxs, unlabeled_idxs[expected.indices.numpy()])
        assert not dataset.labeled_idxs[query_idxs].any()
        strategy.update(query_idxs)
        strategy.train()
    assert dataset.labeled_idxs.sum() == 20 + 2 * N_QUERY


def test_plain_module_and_score_options(digits, cnn_class):
    X, y = digits
    dataset = Data(torch.from_numpy(X).reshape(-1, 1, 8, 8), torch.from_numpy(y), Handler)
    dataset.initialize_labels(50)
    model = cnn_class()
    strategy = GradNormSampling(dataset, model, loader_args={"batch_size": 40}, norm="tensor_sum",
                                score="pseudo_label_ce")
    unlabeled_idxs, unlabeled_data = dataset.get_unlabeled_data()
    expected = rank_unlabeled(model, DataLoader(unlabeled_data, batch_size=40), 3, norm="tensor_sum",
                              score="pseudo_label_ce", progress=False)
    np.testing.assert_array_equal(strategy.query(3), unlabeled_idxs[expected.indices.numpy()])
