"""Hugging Face models out of the box: built from small configs (no download), fed the batches a
tokenizer's collate gives ({"input_ids", "attention_mask", "labels"}, right-padded) or pixel
values, and scored exactly: every backend that can run them against a per-sample loop that
passes each sample's own ids and mask, in float64 and float32."""
import pytest
import torch

from gradnorm_engine import explain, score_pool
from gradnorm_engine.backends.hooks import HooksBackend
from gradnorm_engine.inputs import ModelInputs
from gradnorm_engine.job import eval_mode, make_job
from tests.reference import max_rel_err

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, VOCAB, CLASSES = 5, 9, 50, 3
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=CLASSES)


def bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, max_position_embeddings=32, **SMALL))


def distilbert():
    return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=VOCAB, max_position_embeddings=32, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
        num_labels=CLASSES))


def roberta():
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=1, **SMALL))


def gpt2():
    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=CLASSES, pad_token_id=0,
        bos_token_id=1, eos_token_id=1))


def llama():
    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=32, num_key_value_heads=1, pad_token_id=0, **SMALL))


def vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, **SMALL))


TEXT_MODELS = {"bert": bert, "distilbert": distilbert, "roberta": roberta, "gpt2": gpt2, "llama": llama}


def text_batch(pad: int = 0) -> dict:
    """Right-padded ids and their mask: sample i holds T - i tokens (the first holds all T)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        ids[i, T - i:], mask[i, T - i:] = pad, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(B, dtype=torch.long)}


def per_sample_loop(model, batch: dict) -> torch.Tensor:
    """|| d H / d theta || for each sample alone, its own row of every input, one backward each."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = []
    for i in range(len(next(iter(inputs.values())))):
        logits = model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits
        logp = logits.log_softmax(-1)
        h = -(logp.exp() * logp).sum()
        grads = torch.autograd.grad(h, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        out.append(torch.sqrt(sum(g.double().pow(2).sum() for g in grads if g is not None)))
    return torch.stack(out).detach()


def build(factory, dtype):
    torch.manual_seed(0)
    return factory().to(dtype).eval()


@pytest.mark.parametrize("name", sorted(TEXT_MODELS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_text_classifiers_with_attention_masks_are_exact(name, dtype, tol):
    model = build(TEXT_MODELS[name], dtype)
    batch = text_batch(pad=model.config.pad_token_id or 0)
    want = per_sample_loop(model, batch)
    for backend in ("hooks", "loop"):
        got = score_pool(model, [batch], backend=backend, progress=False)
        assert got.dtype == dtype and max_rel_err(got, want) <= tol, (name, backend, max_rel_err(got, want))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_vit_for_image_classification_reads_pixel_values(dtype, tol):
    model = build(vit, dtype)
    batch = {"pixel_values": torch.randn(B, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(2)),
             "labels": torch.zeros(B, dtype=torch.long)}
    want = per_sample_loop(model, batch)
    for backend in ("hooks", "vmap", "loop"):
        got = score_pool(model, [batch], backend=backend, progress=False)
        assert max_rel_err(got, want) <= tol, (backend, max_rel_err(got, want))


def test_a_sample_scores_the_same_alone_and_padded_in_a_batch():
    model = build(bert, torch.float64)
    batch = text_batch()
    alone = torch.cat([score_pool(model, [{"input_ids": batch["input_ids"][i:i + 1, :T - i],
                                           "attention_mask": batch["attention_mask"][i:i + 1, :T - i]}],
                                  progress=False) for i in range(B)])
    assert max_rel_err(score_pool(model, [batch], progress=False), alone) <= 1e-9


def _hf_batch(name: str, model) -> dict:
    if name == "vit":
        pixels = torch.randn(B, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        return {"pixel_values": pixels, "labels": torch.zeros(B, dtype=torch.long)}
    return text_batch(pad=model.config.pad_token_id or 0)


@pytest.mark.parametrize("name", sorted(TEXT_MODELS) + ["vit"])
def test_every_parameter_is_scored_by_rules_without_the_fallback(name):
    """Embeddings and position tables, attention projections (Conv1D's addmm in GPT-2, rotary
    Llama), LayerNorm/RMSNorm and heads: explain leaves nothing to the exact fallback, and the
    backend's last chunk had no fallback either, in float64."""
    model = build(TEXT_MODELS.get(name, vit), torch.float64)
    batch = _hf_batch(name, model)
    report = explain(model, batch)
    assert report.fallback == [] and report.by("unused") == [], str(report)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    engine = HooksBackend(make_job(model, score="entropy", params=None, logits_fn=None, device=None, autocast=None,
                                   max_memory=None))
    with eval_mode(model), torch.enable_grad():
        engine.sqnorms(ModelInputs((), inputs))
    assert engine.last_fallback == (), engine.last_reasons
