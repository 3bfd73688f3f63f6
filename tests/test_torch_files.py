"""torch_files.load_torch_file: what torch.save wrote, or one line naming the file and the fix."""
import io
import re

import pytest
import torch

from gradnorm_engine.errors import UsageError
from gradnorm_engine.torch_files import load_torch_file


def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


STATE = {"weight": torch.arange(200.0), "bias": torch.zeros(3)}
GOOD = _saved(STATE)
LEGACY = _saved(STATE, _use_new_zipfile_serialization=False)


@pytest.mark.parametrize("weights_only", [True, False])
def test_a_good_file_loads(tmp_path, weights_only):
    for data in (GOOD, LEGACY):
        (tmp_path / "f.pt").write_bytes(data)
        loaded = load_torch_file(str(tmp_path / "f.pt"), what="checkpoint", fix="fix it", weights_only=weights_only)
        assert torch.equal(loaded["weight"], STATE["weight"])


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"plain text, not a checkpoint", "not a torch.save file"),
    (GOOD[: len(GOOD) // 2], "not a torch.save file"),
    (GOOD[:-30], "not a torch.save file"),
    (LEGACY[:300], "damaged"),
    (LEGACY[:40], "damaged"),
    (b"\x80\x02" + b"\xff" * 50, "damaged"),
])
def test_a_damaged_file_is_one_line_naming_it(tmp_path, weights_only, content, reason):
    path = tmp_path / "f.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=f"cannot read checkpoint {re.escape(str(path))} .*{reason}.*; fix it$") as err:
        load_torch_file(str(path), what="checkpoint", fix="fix it", weights_only=weights_only)
    assert "\n" not in str(err.value)


def test_missing_folder_and_python_objects(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_torch_file(str(tmp_path / "nope.pt"), what="checkpoint", fix="fix it")
    with pytest.raises(UsageError, match="not a file"):
        load_torch_file(str(tmp_path), what="checkpoint", fix="fix it")
    (tmp_path / "m.pt").write_bytes(_saved(torch.nn.Linear(2, 2)))
    with pytest.raises(UsageError, match="Python objects"):
        load_torch_file(str(tmp_path / "m.pt"), what="checkpoint", fix="fix it", weights_only=True)
    assert isinstance(load_torch_file(str(tmp_path / "m.pt"), what="checkpoint", fix="fix it", weights_only=False),
                      torch.nn.Linear)
