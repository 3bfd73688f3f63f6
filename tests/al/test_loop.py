"""The active-learning loop: records, resume after a kill, and the bookkeeping invariants."""
import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradnorm_engine.al.loop import ALConfig, apply_query, check_partition, draw_subset, initial_split, run_active_learning
from gradnorm_engine.al.datasets import load_digits
from gradnorm_engine.errors import UsageError
from gradnorm_engine.al.presets import Preset
from gradnorm_engine.al.run_folder import checkpoint_path, read_results
from gradnorm_engine.al.strategies import STRATEGIES


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Preset(initial=20, budget=10, subset=40, cycles=2, trials=1, epochs=1, lr=0.05, milestones=(), batch_size=16,
              width=4)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _config(out, strategies, preset=TINY, **kw):
    return ALConfig(dataset="digits", strategies=list(strategies), preset=preset, out=str(out), device="cpu",
                    progress=False, **kw)


def _check_records(records, preset, pool_size):
    """Labeled sizes grow by budget, queried sets are disjoint from each other and the initial set."""
    by_run = {}
    for r in records:
        by_run.setdefault((r["strategy"], r["trial"]), []).append(r)
    for rs in by_run.values():
        assert [r["cycle"] for r in rs] == list(range(1, len(rs) + 1))
        assert [r["labeled"] for r in rs] == [preset.initial + preset.budget * i for i in range(len(rs))]
        seen = set(rs[0]["initial_indices"])
        assert len(seen) == preset.initial
        for r in rs:
            q = r["queried"]
            assert len(q) == len(set(q)) == preset.budget
            assert not seen & set(q), "an index was queried twice or was already labeled"
            assert all(0 <= i < pool_size for i in q)
            seen |= set(q)
            assert 0.0 <= r["test_acc"] <= 100.0 and len(r["per_class_acc"]) == 10
            assert r["train_s"] >= 0 and r["query_s"] >= 0


def test_two_cycles_of_every_strategy_on_digits(tmp_path, digits):
    records = run_active_learning(_config(tmp_path, STRATEGIES), data=digits, log=None)
    assert len(records) == 2 * len(STRATEGIES)
    assert {r["strategy"] for r in records} == set(STRATEGIES)
    _check_records(records, TINY, len(digits.train))
    assert read_results(str(tmp_path)) == json.loads(json.dumps(records))
    # a trial's strategies start from the same labeled set
    assert len({tuple(r["initial_indices"]) for r in records if r["cycle"] == 1}) == 1
    # ... and the same weights and random streams: cross-entropy-only strategies train identically
    first = {r["strategy"]: r["test_acc"] for r in records if r["cycle"] == 1}
    assert len({first[s] for s in ("ent-gradnorm", "entropy", "coreset", "random")}) == 1
    gradnorm = [r for r in records if r["strategy"] in ("lplgrad", "ent-gradnorm")]
    assert all(r["norm"] == "tensor_sum" and r["backend"] for r in gradnorm)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["initial"] == 20 and saved["norm"] == "tensor_sum"


class Killed(Exception):
    pass


def _kill_at(event, cycle):
    def hook(e, info):
        if e == event and info["cycle"] == cycle:
            raise Killed(f"{e} {info}")
    return hook


@pytest.mark.parametrize("event", ["trained", "saved"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, digits, event):
    preset = Preset(**{**TINY.__dict__, "cycles": 3})
    strategies = ["lplgrad", "random"]
    whole = run_active_learning(_config(tmp_path / "whole", strategies, preset), data=digits, log=None)

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_active_learning(_config(out, strategies, preset), data=digits, log=None, hook=_kill_at(event, 2))
    before = read_results(str(out))
    # results.jsonl is written after the checkpoint: it holds cycle 1 either way, while a kill
    # after the checkpoint keeps cycle 2 in the checkpoint (and resume rebuilds the results from it)
    assert [(r["strategy"], r["cycle"]) for r in before] == [("lplgrad", 1)]
    done = 2 if event == "saved" else 1
    state = torch.load(checkpoint_path(str(out), "lplgrad", 1), weights_only=False)
    assert state["cycle"] == done
    check_partition(state["labeled"], state["unlabeled"], len(digits.train))

    resumed = run_active_learning(_config(out, strategies, preset, resume=True), data=digits, log=None)
    assert len(resumed) == len(whole) == 6
    for a, b in zip(resumed, whole):
        assert (a["strategy"], a["cycle"], a["labeled"], a["queried"]) == (b["strategy"], b["cycle"], b["labeled"], b["queried"])
        assert a["test_acc"] == pytest.approx(b["test_acc"])
    _check_records(resumed, preset, len(digits.train))


@pytest.mark.parametrize("strategy", ["badge", "egl"])
def test_the_newer_engine_strategies_resume_to_the_same_picks(tmp_path, digits, strategy):
    """BADGE draws from the trial's query generator, EGL depends on the trained weights: a resumed
    run must pick as the whole one did."""
    preset = Preset(**{**TINY.__dict__, "cycles": 3})
    whole = run_active_learning(_config(tmp_path / "whole", [strategy], preset), data=digits, log=None)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_active_learning(_config(out, [strategy], preset), data=digits, log=None, hook=_kill_at("trained", 2))
    resumed = run_active_learning(_config(out, [strategy], preset, resume=True), data=digits, log=None)
    assert [r["queried"] for r in resumed] == [r["queried"] for r in whole]
    _check_records(resumed, preset, len(digits.train))


def test_resume_with_more_cycles_continues_after_the_last_query(tmp_path, digits):
    run_active_learning(_config(tmp_path, ["entropy"]), data=digits, log=None)
    longer = Preset(**{**TINY.__dict__, "cycles": 3})
    records = run_active_learning(_config(tmp_path, ["entropy"], longer, resume=True), data=digits, log=None)
    assert [r["labeled"] for r in records] == [20, 30, 40]
    _check_records(records, longer, len(digits.train))
    # nothing left to do: a second resume changes nothing
    again = run_active_learning(_config(tmp_path, ["entropy"], longer, resume=True), data=digits, log=None)
    assert again == records


def test_existing_run_needs_resume_and_matching_settings(tmp_path, digits):
    run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    with pytest.raises(UsageError, match="--resume"):
        run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    other = Preset(**{**TINY.__dict__, "budget": 5})
    with pytest.raises(UsageError, match="budget"):
        run_active_learning(_config(tmp_path, ["random"], other, resume=True), data=digits, log=None)


def test_resume_without_the_checkpoints_is_refused_and_keeps_the_results(tmp_path, digits):
    import shutil

    run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    before = (tmp_path / "results.jsonl").read_text()
    shutil.rmtree(tmp_path / "checkpoints")
    longer = Preset(**{**TINY.__dict__, "cycles": 3})
    with pytest.raises(UsageError, match="random trial 1.*checkpoints.*missing"):
        run_active_learning(_config(tmp_path, ["random"], longer, resume=True), data=digits, log=None)
    assert (tmp_path / "results.jsonl").read_text() == before


def test_resume_on_other_data_is_refused(tmp_path, digits):
    from gradnorm_engine.al.datasets import ALDataset

    run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    import dataclasses

    train = dataclasses.replace(digits.train, images=digits.train.images[:-5], labels=digits.train.labels[:-5])
    fewer = ALDataset(digits.name, train, digits.test, digits.classes)
    with pytest.raises(UsageError, match="pool"):
        run_active_learning(_config(tmp_path, ["random"], resume=True), data=fewer, log=None)
    config = _config(tmp_path, ["random"], resume=True)
    config.data_options = {"image_size": 8}
    with pytest.raises(UsageError, match="data image_size: None -> 8"):
        run_active_learning(config, data=digits, log=None)


def test_stray_files_in_checkpoints_do_not_stop_a_resume(tmp_path, digits):
    run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    (tmp_path / "checkpoints" / ".DS_Store").write_bytes(b"")
    (tmp_path / "checkpoints" / "random" / "trial1-backup.pt").write_bytes(b"junk")
    longer = Preset(**{**TINY.__dict__, "cycles": 3})
    records = run_active_learning(_config(tmp_path, ["random"], longer, resume=True), data=digits, log=None)
    assert [r["labeled"] for r in records] == [20, 30, 40]


def test_run_files_are_readable_like_any_new_file(tmp_path, digits):
    run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    mask = os.umask(0)
    os.umask(mask)
    for path in (tmp_path / "results.jsonl", tmp_path / "config.json", tmp_path / "checkpoints/random/trial1.pt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_an_out_that_is_a_file_is_a_usage_error(tmp_path, digits):
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        with pytest.raises(UsageError, match="--out"):
            run_active_learning(_config(out, ["random"]), data=digits, log=None)


def test_a_diverging_run_stops_with_one_line_naming_the_learning_rate(tmp_path, digits):
    from gradnorm_engine.al.trainer import TrainingDivergedError

    hot = Preset(**{**TINY.__dict__, "lr": 1e12})
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        run_active_learning(_config(tmp_path, ["coreset"], hot), data=digits, log=None)


@pytest.mark.parametrize("change, message", [
    ({"budget": 50}, "larger than --subset"),
    ({"subset": 2000}, "larger than the unlabeled pool"),
    ({"initial": 1}, "at least 2"),
    ({"cycles": 0}, "at least 1"),
    ({"width": 0}, "--width must be at least 1"),
    ({"lr": -1.0}, "--lr must be a positive"),
])
def test_bad_protocols_are_usage_errors(tmp_path, digits, change, message):
    preset = Preset(**{**TINY.__dict__, **change})
    with pytest.raises(UsageError, match=message):
        run_active_learning(_config(tmp_path, ["random"], preset), data=digits, log=None)


def test_unknown_strategy_is_a_usage_error(tmp_path, digits):
    with pytest.raises(UsageError, match="unknown strategy 'bald'"):
        run_active_learning(_config(tmp_path, ["random", "bald"]), data=digits, log=None)


# ---- bookkeeping invariants, as properties ------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 200), st.data())
def test_query_sequences_keep_the_pool_partitioned(pool_size, data):
    initial = data.draw(st.integers(1, pool_size - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    labeled, unlabeled = initial_split(pool_size, initial, g)
    check_partition(labeled, unlabeled, pool_size)
    queried = []
    while unlabeled.numel():
        subset = draw_subset(unlabeled, data.draw(st.integers(1, unlabeled.numel() + 3)), g)
        assert subset.unique().numel() == subset.numel() and torch.isin(subset, unlabeled).all()
        budget = data.draw(st.integers(1, subset.numel()))
        picked = subset[torch.randperm(subset.numel(), generator=g)[:budget]]
        labeled, unlabeled = apply_query(labeled, unlabeled, picked)
        check_partition(labeled, unlabeled, pool_size)
        assert not torch.isin(picked, unlabeled).any()
        queried += picked.tolist()
    assert len(queried) == len(set(queried)) == pool_size - initial


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 60), st.data())
def test_bad_picks_are_refused_and_change_nothing(pool_size, data):
    g = torch.Generator().manual_seed(0)
    labeled, unlabeled = initial_split(pool_size, data.draw(st.integers(1, pool_size - 2)), g)
    bad = data.draw(st.sampled_from(["repeat", "labeled", "outside"]))
    if bad == "repeat":
        picked = torch.stack([unlabeled[0], unlabeled[0]])
    elif bad == "labeled":
        picked = labeled[:1]
    else:
        picked = torch.tensor([pool_size + data.draw(st.integers(0, 5))])
    before = (labeled.clone(), unlabeled.clone())
    message = {"repeat": "more than once", "labeled": "not in the unlabeled pool",
               "outside": "not in the unlabeled pool"}[bad]
    with pytest.raises(RuntimeError, match=message):
        apply_query(labeled, unlabeled, picked)
    assert torch.equal(labeled, before[0]) and torch.equal(unlabeled, before[1])


def test_checkpoints_and_results_are_written_atomically(tmp_path, digits):
    run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    leftovers = [n for root, _, names in os.walk(tmp_path) for n in names if n.startswith(".tmp-")]
    assert leftovers == []


def test_from_scratch_restarts_every_cycle_from_the_initial_weights(tmp_path, digits):
    """With --from-scratch every cycle trains the same initial weights; with one epoch and the
    same shuffles, cycle 2 of a from-scratch run differs from warm start only through the weights."""
    seen = []

    def hook(event, info):
        if event == "trained":
            seen.append(info["cycle"])
    records = run_active_learning(_config(tmp_path, ["random"], from_scratch=True), data=digits, log=None, hook=hook)
    assert seen == [1, 2] and [r["labeled"] for r in records] == [20, 30]
    assert json.load(open(tmp_path / "config.json"))["from_scratch"] is True


def test_paper_and_quick_presets():
    from gradnorm_engine.al.presets import get_preset
    c10 = get_preset("cifar10", "paper")
    assert (c10.initial, c10.budget, c10.cycles, c10.epochs, c10.lr, c10.milestones) == (1000, 1000, 10, 200, 0.1, (160,))
    assert c10.initial + c10.budget * (c10.cycles - 1) == 10000 and c10.resolved_detach_epoch() == 120
    svhn = get_preset("svhn", "paper")
    assert (svhn.lr, svhn.milestones) == (0.01, (40,))
    caltech = get_preset("caltech101", "paper")
    assert (caltech.epochs, caltech.batch_size, caltech.initial + caltech.budget * (caltech.cycles - 1)) == (50, 80, 3500)
    short = get_preset("cifar10", "paper", epochs=50)
    assert short.milestones == (40,) and short.resolved_detach_epoch() == 30
    assert get_preset("digits", "quick", budget=7).budget == 7
    with pytest.raises(UsageError, match="unknown preset"):
        get_preset("digits", "fast")
    for bad, message in (({"epochs": 0}, "--epochs must be at least 1"), ({"lr": -1.0}, "--lr must be a positive"),
                         ({"width": 0}, "--width must be at least 1"), ({"batch_size": 0}, "--batch-size")):
        with pytest.raises(UsageError, match=message):
            get_preset("digits", "quick", **bad)
    with pytest.raises(TypeError, match="sequence of epochs"):
        get_preset("digits", "quick", milestones="16")
    assert get_preset("digits", "quick", milestones=["16"]).milestones == (16,)


def test_a_cut_results_file_is_named_and_a_resume_rebuilds_it(tmp_path, digits):
    records = run_active_learning(_config(tmp_path, ["random"]), data=digits, log=None)
    path = tmp_path / "results.jsonl"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(UsageError, match="line 2 is not a JSON record"):
        read_results(str(tmp_path))
    assert run_active_learning(_config(tmp_path, ["random"], resume=True), data=digits, log=None) == records
    assert read_results(str(tmp_path)) == json.loads(json.dumps(records))


def test_the_gradnorm_query_can_take_the_reference_codes_clamped_entropy(tmp_path, digits, monkeypatch):
    import gradnorm_engine.al.strategies.ent_gradnorm as ent_gradnorm

    asked = []
    real = ent_gradnorm.rank_unlabeled

    def spy(*args, **kwargs):
        asked.append(kwargs["score"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ent_gradnorm, "rank_unlabeled", spy)
    plain = run_active_learning(_config(tmp_path / "a", ["ent-gradnorm"]), data=digits, log=None)
    assert asked == ["entropy"] * 2
    clamped = run_active_learning(_config(tmp_path / "b", ["ent-gradnorm"], score="categorical_entropy"),
                                  data=digits, log=None)
    assert asked[2:] == ["categorical_entropy"] * 2   # the query itself takes the loss, not only the record
    assert [r["score"] for r in clamped] == ["categorical_entropy"] * 2
    assert [r["labeled"] for r in clamped] == [r["labeled"] for r in plain]
    with pytest.raises(UsageError, match="score"):   # a resume keeps the run's loss
        run_active_learning(_config(tmp_path / "b", ["ent-gradnorm"], resume=True), data=digits, log=None)
    with pytest.raises(UsageError, match="unknown score"):
        run_active_learning(_config(tmp_path / "c", ["ent-gradnorm"], score="pseudo"), data=digits, log=None)


def test_file_mode_follows_the_umask_without_touching_it():
    from gradnorm_engine.al.run_folder import _new_file_mode

    old = os.umask(0o027)
    try:
        assert _new_file_mode() == 0o640
        assert os.umask(0o027) == 0o027   # still what was set: read, never changed
    finally:
        os.umask(old)


def test_a_run_of_an_older_version_resumes_only_with_the_loss_it_used(tmp_path, digits):
    run_active_learning(_config(tmp_path, ["ent-gradnorm"]), data=digits, log=None)
    config_path = tmp_path / "config.json"
    saved = json.loads(config_path.read_text())
    del saved["score"], saved["pool"]      # as written before these keys were saved
    config_path.write_text(json.dumps(saved))
    longer = Preset(**{**TINY.__dict__, "cycles": 3})
    with pytest.raises(UsageError, match="score: 'entropy' -> 'categorical_entropy'"):
        run_active_learning(_config(tmp_path, ["ent-gradnorm"], longer, resume=True, score="categorical_entropy"),
                            data=digits, log=None)
    records = run_active_learning(_config(tmp_path, ["ent-gradnorm"], longer, resume=True), data=digits, log=None)
    assert [r["labeled"] for r in records] == [20, 30, 40]


def test_a_lossnet_strategy_on_a_model_without_stages_is_refused_before_any_work(tmp_path, digits):
    from gradnorm_engine.al.models import small_cnn

    factory = lambda data, preset: small_cnn(num_classes=10, in_channels=1, width=4)  # noqa: E731
    with pytest.raises(UsageError, match="stage outputs.*lplgrad, learning-loss"):
        run_active_learning(_config(tmp_path, ["random", "lplgrad", "learning-loss"]), data=digits,
                            model_factory=factory, log=None)
    assert not (tmp_path / "results.jsonl").exists()


def test_weights_broken_by_the_last_step_of_a_cycle_stop_the_run(tmp_path, digits, monkeypatch):
    """The loss of every step was finite, but the last step left NaN weights."""
    from gradnorm_engine.al.trainer import TrainingDivergedError

    real_step = torch.optim.SGD.step

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoning_step)
    one_batch = Preset(**{**TINY.__dict__, "batch_size": 32})   # 20 samples: one step per epoch
    with pytest.raises(TrainingDivergedError, match="weights hold NaN or Inf after epoch 1"):
        run_active_learning(_config(tmp_path, ["entropy"], one_batch), data=digits, log=None)


def test_a_seed_selects_a_fixed_labeled_set_and_leaves_the_rest_sorted(tmp_path, digits):
    """Which samples a seed labels first is pinned (a change would silently alter every recorded
    run), and U is the sorted rest (the subsets a seed draws from U depend on its order)."""
    from gradnorm_engine.al.loop import TrialState

    labeled, unlabeled = initial_split(12, 4, torch.Generator().manual_seed(0))
    assert labeled.tolist() == [8, 0, 5, 9]
    assert unlabeled.tolist() == [1, 2, 3, 4, 6, 7, 10, 11]
    state = TrialState.fresh(None, None, len(digits.train), 20, seed=0, trial=1)
    first = [1284, 1046, 720, 1276, 244, 1123, 450, 1063, 1170, 1313, 91, 614, 191, 1111, 511, 413, 1305, 949, 998, 405]
    assert state.labeled.tolist() == first
    assert state.unlabeled.tolist() == sorted(set(range(len(digits.train))) - set(first))
    records = run_active_learning(_config(tmp_path, ["random"], Preset(**{**TINY.__dict__, "cycles": 1})),
                                  data=digits, log=None)
    assert records[0]["initial_indices"] == first
