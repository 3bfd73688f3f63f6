import pytest
import torch

from gradnorm_engine.inputs import default_logits, extract_input


def test_extract_input_forms():
    x = torch.randn(3, 2)
    assert extract_input(x) is x
    assert extract_input((x, torch.zeros(3))) is x
    assert extract_input([x]) is x
    assert extract_input({"pixel_values": x, "labels": 1}) is x
    assert extract_input({"tokens": x}, input_key="tokens") is x


@pytest.mark.parametrize("batch, message", [
    ("text", "type str"), (None, "type NoneType"), ({"a": torch.ones(2)}, "input_key"),
    ((["not", "tensor"],), "not a tensor"), (torch.tensor(1.0), "0-d"), ((), "tuple"),
])
def test_extract_input_errors_say_what_was_received(batch, message):
    with pytest.raises(TypeError, match=message):
        extract_input(batch)


def test_default_logits():
    z = torch.randn(2, 3)
    assert default_logits(z) is z
    assert default_logits((z, 1)) is z
    assert default_logits({"logits": z}) is z
    with pytest.raises(TypeError, match="logits_fn"):
        default_logits({"scores": z})
    with pytest.raises(TypeError, match="logits_fn"):
        default_logits("x")
