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


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
@pytest.mark.parametrize("backend", ["hooks", "vmap", "loop"])
def test_logits_that_are_not_floating_point_are_refused_with_the_fix(dtype, backend):
    """Integer (bool, complex) logits used to reach torch's log_softmax and raise its
    NotImplementedError ("log_softmax_lastdim_kernel_impl" not implemented for 'Long')."""
    from torch import nn

    from gradnorm_engine import score_pool

    model = nn.Linear(5, 3)
    with pytest.raises(TypeError, match=rf"logits must be floating-point, got dtype {dtype}.*the model must return "
                                        r"floating-point logits, or pass logits_fn="):
        score_pool(model, [torch.randn(4, 5)], logits_fn=lambda out: out.argmax(1, keepdim=True).repeat(1, 3).to(dtype),
                   backend=backend, progress=False)


def test_check_logits_keeps_floating_point_logits():
    from gradnorm_engine.inputs import check_logits

    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        z = torch.zeros(2, 3, dtype=dtype)
        assert check_logits(z, 2) is z
    with pytest.raises(TypeError, match="dtype torch.int64"):
        check_logits(torch.zeros(2, 3, dtype=torch.long), 2)
