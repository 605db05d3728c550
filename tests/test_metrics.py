"""Metrics against hand-computed references on tiny models."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsenn import metrics as M
from sparsenn.core.masks import attach_mask, remove_masks


def first_k_mask(shape, k):
    """Mask keeping the first ``k`` elements in flat order."""
    m = torch.zeros(shape, dtype=torch.bool).reshape(-1)
    m[:k] = True
    return m.reshape(shape)


def linear_with(weight):
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        fc.weight.copy_(weight)
    return fc


@pytest.fixture
def two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    attach_mask(model[0], "weight", first_k_mask((4, 8), 16))
    attach_mask(model[2], "weight", first_k_mask((2, 4), 2))
    return model


# ---------------------------------------------------------------- sparsity


def test_sparsity_over_masked_parameters(two_layers):
    # zeros: 16 of 32 and 6 of 8; biases are not masked, so not counted
    assert M.sparsity(two_layers) == pytest.approx(22 / 40)
    assert M.layer_sparsity(two_layers) == pytest.approx({"0.weight": 0.5, "2.weight": 0.75})


def test_sparsity_without_masks_uses_layer_weights():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "fc": nn.Linear(4, 4), "emb": nn.Embedding(5, 2), "norm": nn.LayerNorm(4),
        "conv": nn.Conv1d(2, 2, 3), "attn": nn.MultiheadAttention(4, 2),
    })
    with torch.no_grad():
        model["fc"].weight[:2] = 0  # 8 zeros of 16
        model["emb"].weight.zero_()  # 10 zeros of 10
        model["fc"].bias.zero_()  # biases and norms are not measured
        model["norm"].weight.zero_()
    names = list(M.layer_sparsity(model))
    assert names == ["fc.weight", "emb.weight", "conv.weight", "attn.in_proj_weight", "attn.out_proj.weight"]
    total = 16 + 10 + 12 + 48 + 16
    assert M.sparsity(model) == pytest.approx(18 / total)


def test_sparsity_of_model_without_weights_is_zero():
    assert M.sparsity(nn.Sequential(nn.ReLU(), nn.LayerNorm(3))) == 0.0
    assert M.layer_sparsity(nn.ReLU()) == {}


def test_sparsity_after_remove_masks(two_layers):
    remove_masks(two_layers)
    # now over both Linear weights, which still hold the zeros
    assert M.sparsity(two_layers) == pytest.approx(22 / 40)


# ---------------------------------------------------------------- bytes


@pytest.fixture
def w4x8():
    w = torch.zeros(4, 8)
    w[0, :3] = 1.0
    w[1, 5] = 2.0
    w[2, :2] = -3.0
    w[3, 7] = 4.0  # nnz = 3 + 1 + 2 + 1 = 7
    return w


def test_dense_csr_bitmask_bytes(w4x8):
    assert M.dense_bytes(w4x8) == 32 * 4
    assert M.csr_bytes(w4x8) == 7 * 4 + 7 * 4 + 5 * 4  # values, col indices, row pointers
    assert M.bitmask_bytes(w4x8) == 4 + 7 * 4
    assert M.dense_bytes(w4x8, dtype_bytes=2) == 64
    assert M.csr_bytes(w4x8, dtype_bytes=2) == 14 + 28 + 20
    assert M.bitmask_bytes(w4x8, dtype_bytes=2) == 4 + 14


def test_bytes_of_conv_weight_and_odd_size():
    w = torch.zeros(2, 4, 1, 1)  # matrix 2x4
    w[1, 3] = 1.0
    assert M.csr_bytes(w) == 4 + 4 + 3 * 4
    odd = torch.zeros(3, 3)
    odd[0, 0] = odd[2, 2] = 1.0
    assert M.bitmask_bytes(odd) == 2 + 8  # ceil(9 / 8) bytes of bits


def test_nm_bytes_valid_2_4():
    w = torch.zeros(4, 8)
    w[:, 0::4] = 1.0
    w[:, 1::4] = 2.0
    w[3, :] = 0.0  # fewer than n per group is still 2:4
    w[3, 6] = 3.0
    # 16 kept slots: 64 value bytes + 16 * 2 bits = 4 bytes
    assert M.nm_bytes(w) == 68
    assert M.nm_bytes(w, 2, 4, dtype_bytes=2) == 36


def test_nm_bytes_other_ratios_round_metadata_up():
    w = torch.zeros(2, 8)
    w[0, 0] = w[0, 4] = w[1, 3] = 1.0
    assert M.nm_bytes(w, 1, 4) == 4 * 4 + 1  # 4 slots, 8 bits
    assert M.nm_bytes(torch.tensor([[0.0, 5.0, 0.0, 0.0]]), 1, 4) == 4 + 1  # 2 bits -> 1 byte
    assert M.nm_bytes(torch.ones(1, 8).tril(-5), 4, 8) == 4 * 4 + 2  # 4 slots * 3 bits = 12 bits


def test_nm_bytes_none_when_not_nm():
    w = torch.zeros(4, 8)
    w[1, 4:7] = 1.0  # 3 nonzeros in one group of 4
    assert M.nm_bytes(w) is None
    assert M.nm_bytes(torch.zeros(4, 6)) is None  # 6 columns are not groups of 4


def test_byte_functions_reject_bad_input():
    w = torch.ones(2, 4)
    with pytest.raises(ValueError, match="dtype_bytes.*0"):
        M.dense_bytes(w, dtype_bytes=0)
    with pytest.raises(ValueError, match="index_bytes.*2.5"):
        M.csr_bytes(w, index_bytes=2.5)
    with pytest.raises(ValueError, match="4:4"):
        M.nm_bytes(w, 4, 4)
    with pytest.raises(TypeError, match="list"):
        M.bitmask_bytes([[1.0]])


# ---------------------------------------------------------------- MACs


def test_macs_linear_3d_input():
    fc = nn.Linear(8, 4)
    attach_mask(fc, "weight", first_k_mask((4, 8), 10))
    model = nn.Sequential(fc)
    out = M.macs(model, torch.randn(2, 3, 8))
    assert out == {"0": (6 * 32, 6 * 10)}  # 6 rows of input, bias not counted


def test_macs_conv2d_stride_padding_groups():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)  # weight (6, 2, 3, 3)
    attach_mask(conv, "weight", first_k_mask((6, 2, 3, 3), 50))
    model = nn.Sequential(conv)
    # H_out = (9 + 2 - 3) // 2 + 1 = 5, W_out = (7 + 2 - 3) // 2 + 1 = 4
    dense = 2 * 5 * 4 * 6 * (4 // 2) * 9
    assert M.macs(model, torch.randn(2, 4, 9, 7)) == {"0": (dense, 2 * 20 * 50)}
    assert M.macs(model, torch.randn(4, 9, 7)) == {"0": (dense // 2, 20 * 50)}  # unbatched


def test_macs_conv1d_dilation():
    model = nn.Sequential(nn.Conv1d(3, 4, 2, dilation=2))
    # L_out = 10 - 2 * (2 - 1) = 8
    assert M.macs(model, torch.randn(1, 3, 10)) == {"0": (8 * 4 * 3 * 2,) * 2}


def _masked_mha(**kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **kw)
    mask = torch.zeros(24, 8, dtype=torch.bool)
    mask[:8] = True  # q rows: 64 nnz
    mask[8:16, :4] = True  # k rows: 32 nnz; v rows: 0
    attach_mask(mha, "in_proj_weight", mask)
    attach_mask(mha.out_proj, "weight", first_k_mask((8, 8), 16))
    return mha


@pytest.mark.parametrize("batch_first", [False, True])
def test_macs_multihead_attention(batch_first):
    mha = _masked_mha(batch_first=batch_first)
    n, L, S = 2, 3, 5
    if batch_first:
        q, kv = torch.randn(n, L, 8), torch.randn(n, S, 8)
    else:
        q, kv = torch.randn(L, n, 8), torch.randn(S, n, 8)
    per_param, per_module = M.macs_by_param(mha, (q, kv, kv))
    attn = 2 * n * L * S * 8  # Q K^T and A V
    assert per_param == {
        "in_proj_weight": (n * L * 64 + 2 * n * S * 64, n * L * 64 + n * S * 32 + 0),
        "out_proj.weight": (n * L * 64, n * L * 16),
    }
    dense = n * L * 64 + 2 * n * S * 64 + n * L * 64 + attn
    assert per_module == {"": (dense, n * L * 64 + n * S * 32 + n * L * 16 + attn)}
    assert M.macs(mha, {"query": q, "key": kv, "value": kv}) == per_module  # keyword call


def test_macs_multihead_attention_separate_kdim_vdim_unbatched():
    mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=4)
    L, S = 3, 5
    out = M.macs_by_param(mha, (torch.randn(L, 8), torch.randn(S, 6), torch.randn(S, 4)))[0]
    assert out == {"q_proj_weight": (L * 64,) * 2, "k_proj_weight": (S * 48,) * 2,
                   "v_proj_weight": (S * 32,) * 2, "out_proj.weight": (L * 64,) * 2}


def test_macs_attention_products_count_bias_kv_and_zero_attn():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, add_zero_attn=True)
    q, kv = torch.randn(3, 1, 8), torch.randn(5, 1, 8)
    s_attn = mha(q, kv, kv)[1].shape[-1]  # the attention matrix really is L x (S + 2)
    assert s_attn == 5 + 2
    projections = 3 * 64 + 2 * 5 * 64 + 3 * 64
    assert M.macs(mha, (q, kv, kv)) == {"": (projections + 2 * 3 * s_attn * 8,) * 2}


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, idx):
        x = self.emb(idx)
        return self.fc(self.attn(x, x, x)[0])


def test_macs_out_proj_not_double_counted_and_embedding_absent():
    out = M.macs(AttnNet(), torch.randint(0, 10, (2, 4)))
    n, L = 2, 4
    assert set(out) == {"attn", "fc"}
    assert out["attn"][0] == n * L * 3 * 64 + n * L * 64 + 2 * n * L * L * 8
    assert out["fc"] == (n * L * 24,) * 2


def test_macs_accumulate_over_repeated_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert M.macs(Twice(), torch.randn(3, 4)) == {"fc": (2 * 3 * 16,) * 2}


# ---------------------------------------------------------------- activations


def test_activation_sparsity_after_relu():
    model = nn.Sequential(linear_with(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])), nn.ReLU())
    x = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
    # linear out [[1, 2, -3], [-1, 1, 0]] -> relu [[1, 2, 0], [0, 1, 0]]
    assert M.activation_sparsity(model, x) == pytest.approx({"0": 1 / 6, "1": 3 / 6})


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = linear_with(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        self.fc2 = linear_with(torch.ones(2, 3))
        attach_mask(self.fc1, "weight", torch.ones(3, 2, dtype=torch.bool))
        attach_mask(self.fc2, "weight", torch.ones(2, 3, dtype=torch.bool))
        self.extra = nn.Linear(3, 3)  # unmasked: not reported

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_input_sparsity_and_dead_inputs_with_functional_relu():
    x = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # fc1 out [[1, 0, -1], [-1, 1, 0]] -> relu [[1, 0, 0], [0, 1, 0]]: feature 2 dead on the batch
    model = FunctionalNet()
    assert M.input_sparsity(model, x) == pytest.approx({"fc1": 1 / 4, "fc2": 4 / 6})
    assert M.dead_inputs(model, x) == {"fc1": 0, "fc2": 1}


def test_dead_inputs_conv_channels():
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    attach_mask(model[0], "weight")
    x = torch.randn(2, 3, 4, 4)
    x[:, 1] = 0.0
    x[0, 2] = 0.0  # channel 2 alive in sample 1
    assert M.dead_inputs(model, x) == {"0": 1}
    assert M.dead_inputs(model, x[1].clone().zero_()) == {"0": 3}  # unbatched: dim 0 is channels


def test_dead_units_hand_made():
    fc = nn.Linear(3, 4)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0] = mask[2] = False
    attach_mask(fc, "weight", mask)
    conv = nn.Conv2d(2, 3, 3)
    cmask = torch.ones(3, 2, 3, 3, dtype=torch.bool)
    cmask[1] = False
    attach_mask(conv, "weight", cmask)
    assert M.dead_units(nn.Sequential(fc, conv)) == {"0.weight": 2, "1.weight": 1}


# ---------------------------------------------------------------- model left as found


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(4, 2)
        attach_mask(self.fc, "weight", first_k_mask((4, 4), 8))

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


def _hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_batch_metrics_leave_model_unchanged():
    torch.manual_seed(0)
    model = WithState()
    model.train()
    model.bn.eval()  # mixed modes must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4)
    for fn in (M.macs, M.activation_sparsity, M.input_sparsity, M.dead_inputs):
        fn(model, x)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.fc.training and not model.bn.training and model.drop.training
    assert _hooks(model) == 0


def test_hooks_removed_and_mode_restored_on_error():
    model = WithState().train()
    with pytest.raises(RuntimeError):
        M.activation_sparsity(model, torch.randn(5, 3))  # wrong feature size
    assert _hooks(model) == 0 and model.training and model.bn.training


def test_bad_batch_input_names_its_type():
    with pytest.raises(TypeError, match="got str"):
        M.macs(WithState(), "not a tensor")
