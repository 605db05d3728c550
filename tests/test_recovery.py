"""Sparse recovery of pruned causal LMs: next-token labels by hand, a tiny LLaMA pruned with sn.oneshot and
recovered (masks exactly zero, loss falls), budgets, the Sparsifier path, and bad arguments."""

import copy

import pytest
import torch

import sparsenn as sn
from sparsenn.core.masks import get_masks, masked_parameters
from sparsenn.train.feature_distillation import FeatureDistiller
from sparsenn.train.recovery import (
    causal_lm_distillation_loss,
    causal_lm_labels,
    recover,
)

transformers = pytest.importorskip("transformers")

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(seed=0, hidden=32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.2)  # peaked next-token distributions: a KL to learn
    return transformers.LlamaForCausalLM(cfg).eval()


def _batches(n=4, length=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, length), generator=g) for _ in range(n)]


def _pruned(pattern="unstructured"):
    dense = _llama()
    student = copy.deepcopy(dense)
    sparsity = 0.5
    sn.oneshot(student, method="wanda", sparsity=sparsity, pattern=pattern, calibration=_batches(2, seed=1),
               measure_error=False)
    return dense, student


def _assert_exact(model, masks):
    now = get_masks(model)
    assert now.keys() == masks.keys() and all(torch.equal(now[n], m) for n, m in masks.items())
    for mp in masked_parameters(model):
        assert torch.all(mp.param[~mp.mask] == 0)


def test_causal_lm_labels_by_hand():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    assert causal_lm_labels(ids).tolist() == [[6, 7, 8, -100], [2, 3, 0, -100]]
    assert causal_lm_labels(ids, mask).tolist() == [[6, 7, 8, -100], [2, 3, -100, -100]]
    with pytest.raises(ValueError, match="2-D integer"):
        causal_lm_labels(torch.zeros(4))


def test_lm_loss_is_the_models_own_loss():
    model = _llama()
    ids = _batches(1)[0]
    out = model(input_ids=ids, labels=ids)
    ours = causal_lm_distillation_loss(out.logits, None, ids, alpha=0.0)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_recover_distill_keeps_oneshot_masks_and_lowers_the_loss(pattern):
    dense, student = _pruned(pattern)
    masks = {n: m.clone() for n, m in get_masks(student).items()}
    train, held_out = _batches(4), _batches(2, seed=7)

    def kl(model, batches):
        with torch.no_grad():
            return sum(causal_lm_distillation_loss(model(input_ids=b).logits, dense(input_ids=b).logits, b).item()
                       for b in batches)

    before = kl(student, train), kl(student, held_out)
    result = recover(student, train, teacher=dense, loss="distill", steps=30, lr=1e-3)
    assert result.steps == 30 and result.stopped_by == "steps" and result.tokens == 30 * 2 * 16
    _assert_exact(student, masks)
    assert kl(student, train) < 0.7 * before[0]
    assert kl(student, held_out) < before[1]
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    if pattern == "2:4":
        w = student.model.layers[0].mlp.up_proj.weight.reshape(-1, 4)
        assert torch.all((w != 0).sum(1) <= 2)
    assert not student.training  # the mode is restored


def test_recover_lm_and_time_budget():
    _, student = _pruned()
    masks = {n: m.clone() for n, m in get_masks(student).items()}
    result = recover(student, _batches(2), loss="lm", time_budget_s=0.3, lr=1e-3)
    assert result.stopped_by == "time" and result.steps >= 1 and result.seconds >= 0.3
    _assert_exact(student, masks)


def test_recover_with_your_optimizer_removes_its_hooks():
    _, student = _pruned()
    opt = torch.optim.SGD(student.parameters(), lr=1e-2)
    recover(student, _batches(1), loss="lm", steps=2, optimizer=opt)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_recover_with_a_sparsifier():
    student, teacher = _llama(1), _llama()
    sp = sn.Sparsifier(student, 0.5, include=["*proj.weight"])
    masks = {n: m.clone() for n, m in sp.masks.items()}
    recover(student, _batches(2), teacher=teacher, steps=5, lr=1e-3, sparsifier=sp)
    assert sp.step_count == 5
    _assert_exact(student, masks)


def test_recover_bad_arguments():
    dense, student = _pruned()
    with pytest.raises(ValueError, match="unknown recovery loss 'kl'; valid: distill, lm"):
        recover(student, _batches(1), teacher=dense, loss="kl", steps=1)
    with pytest.raises(ValueError, match="needs teacher"):
        recover(student, _batches(1), steps=1)
    with pytest.raises(ValueError, match="give steps"):
        recover(student, _batches(1), teacher=dense)
    with pytest.raises(ValueError, match="has no masks"):
        recover(_llama(), _batches(1), teacher=dense, steps=1)
    with pytest.raises(TypeError, match="wrap it in a list"):
        recover(student, _batches(1)[0], teacher=dense, steps=1)
    with pytest.raises(ValueError, match="time_budget_s"):
        recover(student, _batches(1), teacher=dense, time_budget_s=-1)


def test_feature_distiller_on_transformer_blocks_of_different_widths():
    student, teacher = _llama(hidden=32), _llama(hidden=48)
    ids = _batches(1)[0]
    pairs = {"model.layers.1": "model.layers.1", "model.norm": "model.norm"}  # block outputs; RMSNorm by its weight
    with FeatureDistiller(student, teacher, pairs) as fd:
        assert all(fd.projection(n).weight.shape == (48, 32) for n in pairs)
        student(input_ids=ids)
        with torch.no_grad():
            teacher(input_ids=ids)
        loss = fd.loss()
        loss.backward()
        assert loss.item() > 0 and student.model.layers[1].mlp.down_proj.weight.grad is not None
