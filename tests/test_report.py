"""report(): rows per masked weight, totals, exports, and behaviour after finalize."""

import json

import pytest
import torch
from torch import nn

from sparsenn import metrics as M
from sparsenn.core.masks import attach_mask, remove_masks
from sparsenn.report.layer_report import LayerStats, Report, report


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)
        emb_mask = torch.zeros(10, 8, dtype=torch.bool)
        emb_mask[:5] = True  # embeddings 5..9 dead
        attach_mask(self.emb, "weight", emb_mask)
        attach_mask(self.attn, "in_proj_weight", torch.rand(24, 8) < 0.5)
        attach_mask(self.fc, "weight", (torch.arange(8) % 4 < 2).expand(4, 8), pattern="2:4")

    def forward(self, idx):
        x = self.emb(idx)
        return self.fc(torch.relu(self.attn(x, x, x)[0]))


IDX = torch.tensor([[1, 2, 3, 4], [0, 5, 6, 9]])


def test_rows_hand_computed():
    model = Net()
    r = report(model)
    assert [row.name for row in r.rows] == ["emb.weight", "attn.in_proj_weight", "fc.weight"]
    fc = r.rows[2]
    assert (fc.shape, fc.params, fc.nonzeros, fc.sparsity, fc.pattern) == ((4, 8), 32, 16, 0.5, "2:4")
    assert fc.dense_bytes == 128
    assert fc.csr_bytes == 16 * 4 + 16 * 4 + 5 * 4
    assert fc.bitmask_bytes == 4 + 16 * 4
    assert fc.nm_bytes == 16 * 4 + 4  # 16 kept slots, 2 bits each
    assert fc.dead_units == 0 and fc.dense_macs is None and fc.dead_inputs is None
    emb = r.rows[0]
    assert (emb.nonzeros, emb.dead_units, emb.pattern) == (40, 5, "unstructured")
    assert emb.nm_bytes is None  # 4 nonzeros per group of 4: not 2:4


def test_total_row():
    model = Net()
    r = report(model)
    t = r.total
    assert t.name == "total" and t.shape is None and t.pattern == "-"
    assert t.params == 80 + 192 + 32
    assert t.nonzeros == sum(row.nonzeros for row in r.rows)
    assert t.sparsity == pytest.approx(M.sparsity(model))
    assert t.csr_bytes == sum(row.csr_bytes for row in r.rows)
    assert t.dead_units == 5
    assert t.nm_bytes is None  # not every row is N:M


def test_layer_nm_pattern_is_used():
    fc = nn.Linear(8, 2)
    attach_mask(fc, "weight", (torch.arange(8) % 4 == 0).expand(2, 8), pattern="1:4")
    row = report(nn.Sequential(fc)).rows[0]
    assert row.nm_bytes == 4 * 4 + 1  # 4 slots of 1:4, 8 bits of metadata
    assert report(nn.Sequential(fc)).total.nm_bytes == 17


def test_rows_with_example_input():
    model = Net()
    r = report(model, IDX)
    emb, attn, fc = r.rows
    assert (fc.dense_macs, fc.sparse_macs) == (8 * 32, 8 * 16)
    assert (emb.dense_macs, emb.input_sparsity, emb.dead_inputs) == (None, None, None)  # lookup, integer input
    per_param, _ = M.macs_by_param(model, IDX)
    assert (attn.dense_macs, attn.sparse_macs) == per_param["attn.in_proj_weight"]
    assert fc.input_sparsity == pytest.approx(M.input_sparsity(model, IDX)["fc"])
    assert fc.dead_inputs == M.dead_inputs(model, IDX)["fc"]
    assert r.model_macs == M.macs(model, IDX)
    assert r.total.dense_macs == fc.dense_macs + attn.dense_macs
    assert r.total.dead_inputs == fc.dead_inputs + attn.dead_inputs


def test_text_and_markdown():
    model = Net()
    plain = report(model)
    text = str(plain)
    assert text == plain.to_text()
    for name in ("emb.weight", "attn.in_proj_weight", "fc.weight", "total"):
        assert name in text
    assert "MACs" not in text.splitlines()[0]
    assert "50.0" in text  # fc sparsity as a percent with one decimal
    with_input = report(model, IDX).to_text()
    assert "dense->sparse" in with_input and "model MACs" in with_input
    assert max(len(line) for line in with_input.splitlines()) <= 130
    md = report(model, IDX).to_markdown().splitlines()
    assert md[0].startswith("| layer |") and md[1].startswith("|:---")
    assert len(md[0].split("|")) == len(md[2].split("|"))
    assert md[5].startswith("| total |")


def test_records_and_dict_are_json():
    r = report(Net(), IDX)
    records = r.to_records()
    assert [rec["name"] for rec in records] == ["emb.weight", "attn.in_proj_weight", "fc.weight", "total"]
    assert records[2]["shape"] == [4, 8]
    assert set(records[0]) == {f.name for f in LayerStats.__dataclass_fields__.values()}
    json.loads(json.dumps(records))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["total"]["name"] == "total" and len(d["rows"]) == 3 and "attn" in d["model_macs"]
    assert json.loads(json.dumps(report(Net()).to_dict()))["model_macs"] is None


def test_report_after_remove_masks():
    model = Net()
    remove_masks(model)
    r = report(model, IDX)
    assert isinstance(r, Report)
    names = [row.name for row in r.rows]
    assert names == ["emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"]
    assert all(row.pattern == "-" for row in r.rows)
    fc = r.rows[3]
    assert (fc.nonzeros, fc.nm_bytes, fc.dense_macs) == (16, 68, 8 * 32)  # 2:4 checked by default
    assert "attn.out_proj.weight" in str(r)


def test_model_unchanged_by_report():
    model = Net().train()
    model.attn.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report(model, IDX)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    assert model.training and model.fc.training and not model.attn.training


def test_bad_model():
    with pytest.raises(TypeError, match="got dict"):
        report({"fc": nn.Linear(2, 2)})


# ----------------------------------------------------------------------------- DST updates in the report


def _two_layer_rigl():
    """Two layers (8 and 4 weights), RigL dropping half the active weights per update, hand-set masks."""
    import sparsenn as sn

    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False))
    sp = sn.Sparsifier(model, sparsity=0.5, method="rigl", update_every=1, total_steps=100,
                       drop_fraction=0.5, drop_schedule="constant")
    sp.set_masks({"0.weight": torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool),
                  "1.weight": torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)})
    opt = sp.wrap(torch.optim.SGD(model.parameters(), lr=0.0))
    return model, sp, opt


def _update(model, sp, opt, weights, grads):
    with torch.no_grad():
        for (name, p), w, g in zip(model.named_parameters(), weights, grads):
            p.copy_(torch.tensor(w).reshape(p.shape))
            p.grad = torch.tensor(g).reshape(p.shape)
    opt.step()
    assert sp.step()


def _two_updates():
    model, sp, opt = _two_layer_rigl()
    # layer 0: drop 0, 5; grow 3, 6 -> {1, 3, 4, 6}.  layer 1: drop 2 (|w| 0.2); grow 3 (|g| 2 > 1) -> {0, 3}
    _update(model, sp, opt, [[0.1, 0.5, 0, 0, 0.3, 0.2, 0, 0], [0.3, 0, 0.2, 0]],
            [[9.0, 9, 1, 4, 9, 9, 3, 2], [9.0, 1, 9, 2]])
    # layer 0: drop 3, 1; grow 7, 0 -> {0, 4, 6, 7}, 6 of {3, 6} survives.
    # layer 1: drop 0 (0.3 < 0.9); grow 2 (|g| 5 > 1) -> {2, 3}, 3 of {3} survives
    _update(model, sp, opt, [[0, 0.4, 0, 0.05, 0.6, 0, 0.7, 0], [0.3, 0, 0, 0.9]],
            [[5.0, 9, 1, 9, 9, 2, 9, 8], [9.0, 1, 5, 9]])
    return model, sp


def test_dst_updates_hand_computed():
    model, sp = _two_updates()
    r = report(model, sparsifier=sp)
    assert r.method == "rigl" and [u.step for u in r.updates] == [1, 2]
    first, second = r.updates
    assert (first.dropped, first.grown, first.active, first.params) == (3, 3, 6, 12)
    assert (first.survived, first.survival, first.changed, first.mask_change) == (None, None, 6, 0.5)
    assert (second.dropped, second.grown, second.survived, second.changed) == (3, 3, 2, 6)
    assert second.survival == pytest.approx(2 / 3) and second.drop_fraction == 0.5
    assert second.layers["1.weight"]["survived"] == 1 and second.layers["0.weight"]["survival"] == 0.5
    assert sp.masks["1.weight"].reshape(-1).tolist() == [False, False, True, True]


def test_dst_updates_in_text_markdown_and_dict():
    model, sp = _two_updates()
    r = report(model, torch.randn(3, 4), sparsifier=sp)
    text = r.to_text()
    assert str(r) == text and "DST mask updates (rigl): 2" in text
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["step", "drop", "frac"])
    assert lines[head + 2].split() == ["1", "0.500", "3", "3", "-", "50.00"]
    assert lines[head + 3].split() == ["2", "0.500", "3", "3", "66.7", "50.00"]
    assert max(len(line) for line in lines) <= 130
    md = r.to_markdown().splitlines()
    assert "| step | drop frac | dropped | grown | grown alive % | mask change % |" in md
    assert md[-1] == "| 2 | 0.500 | 3 | 3 | 66.7 | 50.00 |"
    d = json.loads(json.dumps(r.to_dict()))
    assert d["method"] == "rigl" and [u["step"] for u in d["updates"]] == [1, 2]
    assert d["updates"][1]["survived"] == 2 and d["updates"][1]["layers"]["0.weight"]["dropped"] == 2
    assert d["rows"] == report(model, torch.randn(3, 4)).to_dict()["rows"]  # the rows do not change
    plain = report(model)
    assert plain.updates is None and "DST" not in plain.to_text() and "DST" not in plain.to_markdown()
    assert plain.to_dict()["updates"] is None and plain.to_dict()["method"] is None


def test_dst_updates_static_finalized_and_wrapped():
    import sparsenn as sn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sp = sn.Sparsifier(model, sparsity=0.5, method="static")
    r = report(model, sparsifier=sp)
    assert r.updates == [] and "DST mask updates (static): none so far" in r.to_text()
    assert "none so far" in r.to_markdown()
    assert report(nn.DataParallel(model), sparsifier=sp).updates == []  # a wrapped model is unwrapped

    model, sp = _two_updates()
    sp.finalize()  # the history outlives the masks
    assert [u.grown for u in report(model, sparsifier=sp).updates] == [3, 3]


def test_dst_updates_bad_sparsifier():
    import sparsenn as sn

    model, sp = _two_updates()
    with pytest.raises(TypeError, match="sparsifier must be a sparsenn.Sparsifier, got dict"):
        report(model, sparsifier={"method": "rigl"})
    other, _ = _two_updates()
    with pytest.raises(ValueError, match="different model"):
        report(other, sparsifier=sp)
    torch.manual_seed(0)
    pruned = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="method 'magnitude' records no per-update diagnostics"):
        report(pruned, sparsifier=sn.Sparsifier(pruned, sparsity=0.5))
