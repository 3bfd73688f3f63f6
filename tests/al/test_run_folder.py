"""The run folder under --resume: what a resume reads, what it refuses (one line naming the problem
and the fix, before any work) and what it leaves alone; and its writes, which fail whole."""
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch

from gradnorm_engine.al import run_folder
from gradnorm_engine.al.datasets import ALDataset, load_digits
from gradnorm_engine.al.loop import ALConfig, run_active_learning
from gradnorm_engine.al.presets import Preset
from gradnorm_engine.al.run_folder import atomic_torch_save, read_results, write_results
from gradnorm_engine.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Preset(initial=20, budget=10, subset=40, cycles=2, trials=1, epochs=1, lr=0.05, milestones=(), batch_size=16,
              width=4)
LONGER = dataclasses.replace(TINY, cycles=3)
STRATEGIES = ["entropy", "random"]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _config(out, preset=TINY, strategies=STRATEGIES, **kw):
    return ALConfig(dataset="digits", strategies=list(strategies), preset=preset, out=str(out), device="cpu",
                    progress=False, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits):
    """A finished two-cycle run of entropy and random (one trial); tests change copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_active_learning(_config(out), data=digits, log=None)
    return out


@pytest.fixture
def run(tmp_path, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _no_work(event, info):
    raise AssertionError(f"the run began ({event} {info}) before its folder was checked")


def _refused(run, data, match, preset=LONGER, strategies=STRATEGIES, **kw) -> str:
    """A resume of ``run`` is refused with a one-line UsageError matching ``match``, before any training."""
    with pytest.raises(UsageError, match=match) as err:
        run_active_learning(_config(run, preset, strategies, resume=True, **kw), data=data, log=None, hook=_no_work)
    assert "\n" not in str(err.value)
    return str(err.value)


def _keys(records):
    return [(r["strategy"], r["trial"], r["cycle"]) for r in records]


# ---- item 1: copies inside checkpoints/ -------------------------------------------------------


def test_copies_outside_the_runs_strategy_folders_are_left_alone(run, digits):
    ckpt = run / "checkpoints"
    shutil.copytree(ckpt / "entropy", ckpt / "entropy.bak")
    (ckpt / "old").mkdir()
    shutil.copy(ckpt / "random" / "trial1.pt", ckpt / "old" / "trial1.pt")
    shutil.copy(ckpt / "random" / "trial1.pt", ckpt / "random" / "trial01.pt")
    records = run_active_learning(_config(run, LONGER, resume=True), data=digits, log=None)
    assert _keys(records) == [(s, 1, c) for s in STRATEGIES for c in (1, 2, 3)]
    assert _keys(read_results(str(run))) == _keys(records)
    assert (ckpt / "entropy.bak" / "trial1.pt").exists() and (ckpt / "old" / "trial1.pt").exists()


@pytest.mark.parametrize("copy, named, preset, strategies", [
    # a trial the run does not have: read as one, or taken over by a resume with more --trials
    (("random/trial1.pt", "random/trial7.pt"), "trial7.pt", LONGER, STRATEGIES),
    (("random/trial1.pt", "random/trial7.pt"), "trial7.pt", dataclasses.replace(LONGER, trials=7), STRATEGIES),
    # a strategy the run does not have: read as one, or taken over when it is added
    (("random", "lplgrad"), "lplgrad", LONGER, STRATEGIES),
    (("random", "lplgrad"), "lplgrad", LONGER, ["lplgrad", *STRATEGIES]),
    # another (strategy, trial)'s checkpoint in the place of one of the run's
    (("entropy/trial1.pt", "random/trial1.pt"), "random/trial1.pt.*entropy trial 1", LONGER, STRATEGIES),
])
def test_a_checkpoint_that_is_not_the_runs_own_is_refused(run, digits, copy, named, preset, strategies):
    source, target = (run / "checkpoints" / p for p in copy)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    before = (run / "results.jsonl").read_bytes()
    message = _refused(run, digits, named, preset, strategies)
    assert "move it out of" in message or "restore" in message
    assert (run / "results.jsonl").read_bytes() == before


# ---- item 2: a resume must find the run's settings ---------------------------------------------


@pytest.mark.parametrize("config_text", [None, "{}"])
@pytest.mark.parametrize("preset, options", [(LONGER, {"seed": 1}), (dataclasses.replace(LONGER, epochs=2), {})])
def test_a_resume_without_the_runs_settings_is_refused(run, digits, config_text, preset, options):
    path = run / "config.json"
    if config_text is None:
        path.unlink()
    else:
        path.write_text(config_text)
    before = (run / "results.jsonl").read_bytes()
    message = _refused(run, digits, "config.json", preset, **options)
    assert "restore" in message and "another --out" in message
    assert (path.read_text() == config_text) if config_text is not None else not path.exists()
    assert (run / "results.jsonl").read_bytes() == before


def test_a_config_lacking_settings_is_refused(run, digits):
    path = run / "config.json"
    saved = json.loads(path.read_text())
    del saved["seed"], saved["epochs"]
    path.write_text(json.dumps(saved))
    message = _refused(run, digits, "config.json", LONGER, seed=1)
    assert "seed" in message and "epochs" in message


# ---- item 3: other data of the same counts and class names --------------------------------------


def _changed(digits, split, what):
    """``digits`` with one image or one label of ``split`` changed: the same counts and class names."""
    part = getattr(digits, split)
    images, labels = part.images.clone(), part.labels.clone()
    if what == "image":
        images[0] = 255 - images[0]
    else:
        labels[0] = (labels[0] + 1) % 10
    changed = dataclasses.replace(part, images=images, labels=labels)
    return ALDataset(digits.name, **{"train": digits.train, "test": digits.test, split: changed},
                     classes=digits.classes)


@pytest.mark.parametrize("split, what", [("train", "image"), ("train", "label"), ("test", "image"), ("test", "label")])
def test_a_resume_on_other_images_of_the_same_counts_is_refused(run, digits, split, what):
    message = _refused(run, _changed(digits, split, what), "other data")
    assert split in message


def test_a_run_written_before_the_fingerprint_resumes_and_gets_one(run, digits):
    path = run / "config.json"
    saved = json.loads(path.read_text())
    del saved["fingerprint"]             # as written before the fingerprint was saved
    path.write_text(json.dumps(saved))
    records = run_active_learning(_config(run, LONGER, resume=True), data=digits, log=None)
    assert [r["labeled"] for r in records if r["strategy"] == "random"] == [20, 30, 40]
    assert set(json.loads(path.read_text())["fingerprint"]) == {"train", "test"}
    _refused(run, _changed(digits, "train", "image"), "other data", dataclasses.replace(LONGER, cycles=4))


# ---- item 7: a damaged config.json --------------------------------------------------------------


@pytest.mark.parametrize("edit, named", [
    ("", "not valid JSON"),
    ('{"dataset": "digits",', "not valid JSON"),
    ("[1, 2]", "a list"),
    ('"digits"', "a string"),
    ({"trials": "three"}, "trials"),
    ({"cycles": None}, "cycles"),
    ({"strategies": "random"}, "strategies"),
    ({"strategies": [1, 2]}, "strategies"),
    ({"data": []}, "data"),
    ({"seed": True}, "seed"),
    ({"milestones": 16}, "milestones"),
])
def test_a_damaged_config_is_refused_in_one_line(run, digits, edit, named):
    path = run / "config.json"
    if isinstance(edit, dict):
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    else:
        path.write_text(edit)
    message = _refused(run, digits, re.escape(str(path)))
    assert named in message


def test_a_config_that_is_a_folder_is_refused(run, digits):
    (run / "config.json").unlink()
    (run / "config.json").mkdir()
    _refused(run, digits, "config.json.*not a file")


# ---- item 8: a damaged checkpoint ---------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty", "junk", "a list", "no records", "a cycle twice"])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_it(run, digits, damage):
    path = run / "checkpoints" / "random" / "trial1.pt"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "junk":
        path.write_bytes(b"not a checkpoint at all " * 20)
    elif damage == "a list":
        torch.save([1, 2, 3], path)
    else:
        state = torch.load(path, weights_only=False)
        if damage == "no records":
            del state["records"]
        else:
            state["records"][1]["cycle"] = 1     # cycle 1 twice
        torch.save(state, path)
    message = _refused(run, digits, re.escape(str(path)))
    assert "restore" in message or "another --out" in message


# ---- item 9: a folder that cannot be written ----------------------------------------------------


@pytest.mark.parametrize("where", ["results.jsonl is a folder", "checkpoints/random is a file",
                                   "checkpoints/random is read-only", "checkpoints/random/trial1.pt is a folder"])
def test_a_run_folder_that_cannot_be_written_is_refused_before_any_work(run, digits, monkeypatch, where):
    path = run / where.split()[0]
    if where.endswith("read-only"):
        real_access = os.access

        def access(p, mode, *args, **kwargs):   # as for a user without write permission (tests may run as root)
            if os.path.abspath(p) == str(path) and mode & os.W_OK:
                return False
            return real_access(p, mode, *args, **kwargs)
        monkeypatch.setattr(os, "access", access)
    else:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        path.mkdir() if where.endswith("a folder") else path.write_text("")
    _refused(run, digits, re.escape(where.split()[0]))


# ---- item 15: temporary files of a killed run ---------------------------------------------------


class Killed(BaseException):
    pass


class _DyingOs:
    """``os`` as the run folder's writes see it in a process SIGKILLed at its ``when``-th fsync:
    the write stops there and nothing after it runs (no cleanup)."""

    def __init__(self, when):
        self.calls, self.when, self.killed = 0, when, False

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd):
        self.calls += 1
        if self.calls == self.when:
            self.killed = True
            raise Killed
        os.fsync(fd)

    def unlink(self, path):
        if not self.killed:
            os.unlink(path)


@pytest.mark.parametrize("when, left", [(1, ".tmp-*config.json"), (2, "checkpoints/entropy/.tmp-*trial1.pt"),
                                        (3, ".tmp-*results.jsonl")])
def test_a_resume_removes_the_temporary_file_a_killed_run_left(run, digits, monkeypatch, when, left):
    monkeypatch.setattr(run_folder, "os", _DyingOs(when))   # killed writing config.json, a checkpoint, results
    with pytest.raises(Killed):
        run_active_learning(_config(run, LONGER, resume=True), data=digits, log=None)
    monkeypatch.undo()
    stale = [p.relative_to(run).as_posix() for p in run.rglob(".tmp-*")]
    assert [re.sub(r"\.tmp-\w{8}", ".tmp-*", p) for p in stale] == [left], stale
    # files of the temporary files' form that are not the run's own stay
    theirs = [run / ".tmp-notes.txt", run / ".tmp-abcdefgh", run / ".tmp-abcd1234summary.md",
              run / ".tmp-abcd1234results.jsonl.orig", run / "checkpoints" / "random" / ".tmp-mine",
              run / "checkpoints" / "entropy.bak" / ".tmp-abcd1234trial1.pt"]
    for path in theirs:
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    records = run_active_learning(_config(run, LONGER, resume=True), data=digits, log=None)
    assert _keys(records) == [(s, 1, c) for s in STRATEGIES for c in (1, 2, 3)]
    assert sorted(run.rglob(".tmp-*")) == sorted(theirs)


# ---- item 19: a write that fails part-way leaves the old file whole ------------------------------


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot be saved")


@pytest.fixture
def small_file_limit():
    """Writes beyond 64 bytes of any file fail (EFBIG, as on a full disk) while the fixture's
    ``limited()`` is active."""
    resource = pytest.importorskip("resource")
    import contextlib
    import signal

    @contextlib.contextmanager
    def limited():
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
    return limited


@pytest.mark.parametrize("file, failure", [("results", "serialising"), ("checkpoint", "serialising"),
                                           ("results", "writing"), ("checkpoint", "writing")])
def test_a_rewrite_that_fails_part_way_leaves_the_old_file_whole(tmp_path, small_file_limit, file, failure):
    path = tmp_path / ("results.jsonl" if file == "results" else "trial1.pt")
    big = list(range(5000))
    if file == "results":
        write_results(str(tmp_path), [{"strategy": "random", "cycle": 1}])
        new = [{"strategy": "random", "cycle": c, "queried": big} for c in (1, 2)]
        if failure == "serialising":
            new.append({"strategy": "random", "cycle": 3, "queried": object()})
        rewrite = lambda: write_results(str(tmp_path), new)  # noqa: E731
    else:
        atomic_torch_save({"cycle": 1}, str(path))
        new = {"cycle": 2, "labeled": torch.arange(5000), **({"records": Unpicklable()} if failure == "serialising" else {})}
        rewrite = lambda: atomic_torch_save(new, str(path))  # noqa: E731
    before = path.read_bytes()
    with pytest.raises((OSError, TypeError, RuntimeError)):
        if failure == "writing":
            with small_file_limit():
                rewrite()
        else:
            rewrite()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # and no temporary file is left
