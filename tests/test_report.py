"""report(): rows per masked weight, totals, exports, and behaviour after finalize."""

import json

import pytest
import torch
from torch import nn

from sparsenn import metrics as M
from sparsenn.masks import attach_mask, remove_masks
from sparsenn.report import LayerStats, Report, report


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
