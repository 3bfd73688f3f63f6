"""DeepAL / DeepAL+ adapter: GradNormSampling.query(n) returns rank_unlabeled's top-n as dataset indices.

DeepAL (ej0cl6/deep-active-learning) and DeepAL+ (SineZHAN/deepALplus) are codebases, not
packages, so their Data / Net / handlers are mirrored here in miniature: the interfaces the
strategy relies on, nothing more.
"""
import argparse

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradnorm_engine import rank_unlabeled, score_pool
from gradnorm_engine.integrations.deepal import GradNormSampling

N_QUERY = 7


# --- DeepAL ---------------------------------------------------------------------------------

class Handler(Dataset):
    """DeepAL's handlers yield (x, y, index); the transform is fixed by the handler class."""

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


def test_untrained_net_and_wrapper_passed_as_the_model(digits, cnn_class):
    X, y = digits
    dataset = Data(torch.from_numpy(X).reshape(-1, 1, 8, 8), torch.from_numpy(y), Handler)
    dataset.initialize_labels(20)

    class MNISTNet(cnn_class):   # DeepAL's nets are classes, their output (logits, embedding)
        def __init__(self):
            super().__init__(with_embedding=True)

    net = Net(MNISTNet, {"n_epoch": 1, "train_args": {"batch_size": 32}, "test_args": {"batch_size": 64}})
    strategy = GradNormSampling(dataset, net)
    with pytest.raises(TypeError, match=r"call strategy.train\(\) before strategy.query\(\)"):
        strategy.query(3)
    loader = DataLoader(dataset.get_unlabeled_data()[1], batch_size=64)
    with pytest.raises(TypeError, match=r"DeepAL's Net before training.*\.clf"):
        score_pool(net, loader)
    strategy.train()
    with pytest.raises(TypeError, match=r"got Net; it holds one at \.clf: pass its \.clf"):
        score_pool(net, loader)


# --- DeepAL+ --------------------------------------------------------------------------------

class RandomFlip:
    """transforms.RandomHorizontalFlip on a tensor image."""

    def __call__(self, x):
        return x.flip(-1) if torch.rand(()) < 0.5 else x


class Flip:
    def __call__(self, x):
        return x.flip(-1)


class Standardise:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x):
        return (x - self.mean) / self.std


class PlusHandler(Dataset):
    """DeepAL+'s handlers take the transform: Handler(X, Y, transform), items (transform(x), y, index)."""

    def __init__(self, X, Y, transform):
        self.X, self.Y, self.transform = X, Y, transform

    def __getitem__(self, index):
        return self.transform(self.X[index]), self.Y[index], index

    def __len__(self):
        return len(self.X)


class PlusData:
    """DeepAL+'s Data: labeled and unlabeled data with args_task["transform_train"], test data
    with args_task["transform"]."""

    def __init__(self, X_train, Y_train, X_test, Y_test, handler, args_task):
        self.X_train, self.Y_train, self.X_test, self.Y_test = X_train, Y_train, X_test, Y_test
        self.handler, self.args_task = handler, args_task
        self.n_pool, self.n_test = len(X_train), len(X_test)
        self.labeled_idxs = np.zeros(self.n_pool, dtype=bool)

    def initialize_labels(self, num):
        self.labeled_idxs[np.random.default_rng(0).permutation(self.n_pool)[:num]] = True

    def get_labeled_data(self):
        idxs = np.arange(self.n_pool)[self.labeled_idxs]
        return idxs, self.handler(self.X_train[idxs], self.Y_train[idxs], self.args_task["transform_train"])

    def get_unlabeled_data(self):
        idxs = np.arange(self.n_pool)[~self.labeled_idxs]
        return idxs, self.handler(self.X_train[idxs], self.Y_train[idxs], self.args_task["transform_train"])

    def get_test_data(self):
        return self.handler(self.X_test, self.Y_test, self.args_task["transform"])


class PlusNet:
    """DeepAL+'s Net: params is args_task; train() builds ``self.clf = net(dim=..., pretrained=...,
    num_classes=...)`` and trains with loader_tr_args; get_model() returns clf. ``trained_on``
    records the last training data (for the test)."""

    def __init__(self, net, params, device="cpu"):
        self.net, self.params, self.device = net, params, device

    def train(self, data):
        self.trained_on = data
        self.clf = self.net(dim=data.X.shape[1:], pretrained=self.params["pretrained"],
                            num_classes=self.params["num_class"]).to(self.device)
        self.clf.train()
        optimizer = torch.optim.SGD(self.clf.parameters(), **self.params["optimizer_args"])
        for _ in range(self.params["n_epoch"]):
            for x, y, _ in DataLoader(data, shuffle=True, **self.params["loader_tr_args"]):
                optimizer.zero_grad()
                out, _ = self.clf(x)
                nn.functional.cross_entropy(out, y).backward()
                optimizer.step()

    def get_model(self):
        return self.clf


def plus_setup(digits, cnn_class, transform_train=None):
    X, y = digits
    X = torch.from_numpy(X).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(y)
    args_task = {"n_epoch": 2, "name": "digits", "num_class": 10, "pretrained": False,
                 "transform_train": transform_train or RandomFlip(), "transform": Standardise(0.3, 0.4),
                 "loader_tr_args": {"batch_size": 32}, "loader_te_args": {"batch_size": 64},
                 "optimizer": "SGD", "optimizer_args": {"lr": 0.1}}
    dataset = PlusData(X[:250], y[:250], X[250:], y[250:], PlusHandler, args_task)
    net = PlusNet(lambda dim, pretrained, num_classes: cnn_class(with_embedding=True), args_task)
    args_input = argparse.Namespace(ALstrategy="GradNormSampling", batch=N_QUERY, initseed=20, quota=2 * N_QUERY)
    dataset.initialize_labels(20)
    return dataset, net, args_input, args_task


def unlabeled_view(dataset, transform):
    idxs, _ = dataset.get_unlabeled_data()
    return idxs, PlusHandler(dataset.X_train[idxs], dataset.Y_train[idxs], transform)


def test_deepal_plus_rounds_score_the_pool_with_the_test_transform(digits, cnn_class):
    dataset, net, args_input, args_task = plus_setup(digits, cnn_class)
    strategy = GradNormSampling(dataset, net, args_input, args_task)   # as DeepAL+'s get_strategy builds it
    strategy.train()
    for _ in range(2):
        unlabeled_idxs, test_view = unlabeled_view(dataset, args_task["transform"])
        expected = rank_unlabeled(strategy.get_model(), DataLoader(test_view, batch_size=19), N_QUERY,
                                  progress=False)
        query_idxs = strategy.query(N_QUERY)   # the random training flip never reaches the scores
        np.testing.assert_array_equal(query_idxs, unlabeled_idxs[expected.indices.numpy()])
        assert not dataset.labeled_idxs[query_idxs].any()
        strategy.update(query_idxs)
        strategy.train()
    assert strategy.get_model() is net.clf
    assert strategy.get_labeled_count() == 20 + 2 * N_QUERY


def test_deepal_plus_pool_transform_train_or_a_transform_of_your_own(digits, cnn_class):
    dataset, net, args_input, args_task = plus_setup(digits, cnn_class, transform_train=Flip())
    GradNormSampling(dataset, net, args_input, args_task).train()
    for pool_transform, transform in (("train", Flip()), (Standardise(0.5, 2.0), Standardise(0.5, 2.0))):
        strategy = GradNormSampling(dataset, net, args_input, args_task, pool_transform=pool_transform)
        unlabeled_idxs, view = unlabeled_view(dataset, transform)
        expected = rank_unlabeled(net.clf, DataLoader(view, batch_size=64), 5, progress=False)
        np.testing.assert_array_equal(strategy.query(5), unlabeled_idxs[expected.indices.numpy()])
    with pytest.raises(ValueError, match="pool_transform must be 'test', 'train' or a transform"):
        GradNormSampling(dataset, net, pool_transform="eval")


def test_deepal_plus_loader_settings_and_training_data(digits, cnn_class):
    dataset, net, args_input, args_task = plus_setup(digits, cnn_class)
    # the test transform is found without args_task too: on the dataset, or in net.params
    for strategy in (GradNormSampling(dataset, net, args_input, args_task), GradNormSampling(dataset, net)):
        idxs, loader = strategy.pool_loader()
        assert loader.batch_size == 64   # loader_te_args
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        assert loader.dataset.transform is args_task["transform"]
        np.testing.assert_array_equal(idxs, np.flatnonzero(~dataset.labeled_idxs))
    assert dataset.get_unlabeled_data()[1].transform is args_task["transform_train"]   # left as it was
    _, labeled = dataset.get_labeled_data()
    strategy.train(data=labeled)   # DeepAL+'s CEAL trains on data of its own
    assert net.trained_on is labeled
    with pytest.raises(NotImplementedError, match="WAAL"):
        strategy.train(model_name="WAAL")
