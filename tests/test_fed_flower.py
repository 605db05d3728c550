"""The Flower adapter (sparsenn.federated.flower) without a network: the client's fit/evaluate are called
directly and the strategy's aggregate_fit gets constructed results."""

import importlib
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsenn as sn
from sparsenn.core.masks import get_masks
from sparsenn.federated import TopK, get_state, make_compressor

flwr = pytest.importorskip("flwr")
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters

from sparsenn.federated.flower import SparseClient, SparseFedAvg, model_to_ndarrays


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(sparse=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    if sparse:
        sn.Sparsifier(model, sparsity=0.7)
    return model


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 10, generator=g)
    return TensorDataset(x, (x[:, :3]).argmax(1))


def _fit(client, parameters, round_=1):
    arrays, n, metrics = client.fit(parameters, {"server_round": round_})
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)


def test_fit_sends_messages_and_strategy_applies_their_weighted_mean():
    server_model = _model()
    strategy = SparseFedAvg(server_model)
    start = model_to_ndarrays(server_model)
    clients = [SparseClient(_model(), _data(i), compressor=TopK(0.25), client_id=i, lr=0.1) for i in range(2)]
    clients[1].train_data = TensorDataset(*[t[:10] for t in _data(1).tensors])  # 40 and 10 samples
    results = [(None, _fit(c, start)) for c in clients]
    for _, res in results:
        assert all(a.dtype == np.uint8 and a.ndim == 1 for a in flwr.common.parameters_to_ndarrays(res.parameters))
        assert res.metrics["message_bytes"] == sum(len(a) for a in flwr.common.parameters_to_ndarrays(res.parameters))
    new, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics == {"rejected": 0, "message_bytes": sum(r.metrics["message_bytes"] for _, r in results)}
    got = flwr.common.parameters_to_ndarrays(new)

    # reference: decompress what each client sent (its residual made it exact) and average by sample counts
    comp = make_compressor(TopK(0.25))
    for i, name in enumerate(get_state(server_model)):
        sent = [comp.decompress(bytes(a[i])).double()
                for a in (flwr.common.parameters_to_ndarrays(r.parameters) for _, r in results)]
        expected = (torch.as_tensor(start[i]).double() + sent[0] * 0.8 + sent[1] * 0.2).float()
        assert torch.equal(torch.as_tensor(got[i]), expected), name
        assert int((sent[0] != 0).sum()) == max(1, round(0.25 * start[i].size))


def test_masked_model_sends_kept_values_and_stays_masked():
    server_model = _model(sparse=True)
    masks = get_masks(server_model)
    strategy = SparseFedAvg(server_model)
    client = SparseClient(_model(sparse=True), _data(0), compressor="dense", lr=0.1)
    res = _fit(client, model_to_ndarrays(server_model))
    new, _ = strategy.aggregate_fit(1, [(None, res)], [])
    names = list(get_state(server_model))
    got = dict(zip(names, flwr.common.parameters_to_ndarrays(new)))
    for name, mask in masks.items():
        value = torch.as_tensor(got[name])
        assert not bool(value[~mask].any()) and bool(value[mask].any())
    arrays = flwr.common.parameters_to_ndarrays(res.parameters)
    kept = {n: int(m.sum()) for n, m in masks.items()}
    for name, a in zip(names, arrays):
        if name in kept:  # header (15 + 8 bytes for 2-D) + 4 bytes per kept value, no index
            assert len(a) == 23 + 4 * kept[name]


def test_hostile_results_are_rejected_and_left_out():
    server_model = _model()
    strategy = SparseFedAvg(server_model)
    start = model_to_ndarrays(server_model)
    good = _fit(SparseClient(_model(), _data(0), compressor="stc"), start)
    arrays = flwr.common.parameters_to_ndarrays(good.parameters)
    flipped = [a.copy() for a in arrays]
    flipped[0][0] ^= 0xFF  # bad magic
    wrong_dtype = [a.astype(np.int16) for a in arrays]
    too_few = arrays[:-1]
    not_npy = Parameters(tensors=[b"garbage"] * len(arrays), tensor_type="numpy.ndarray")
    bad = [FitRes(Status(Code.OK, ""), ndarrays_to_parameters(x), 40, {}) for x in (flipped, wrong_dtype, too_few)]
    bad += [FitRes(Status(Code.OK, ""), not_npy, 40, {}),
            FitRes(Status(Code.OK, ""), good.parameters, 0, {})]  # no samples
    new, metrics = strategy.aggregate_fit(3, [(None, r) for r in [*bad, good]], [])
    assert metrics["rejected"] == len(bad) and len(strategy.rejected) == len(bad)
    assert all(r == 3 for r, _ in strategy.rejected)
    alone = SparseFedAvg(_model()).aggregate_fit(3, [(None, good)], [])[0]
    assert all(np.array_equal(a, b) for a, b in zip(flwr.common.parameters_to_ndarrays(new),
                                                     flwr.common.parameters_to_ndarrays(alone)))
    assert SparseFedAvg(_model()).aggregate_fit(1, [(None, bad[0])], [])[0] is None


def test_client_residual_persists_across_rounds_and_evaluate():
    client = SparseClient(_model(), _data(0), compressor=TopK(0.1), test_data=_data(5))
    start = model_to_ndarrays(_model())
    client.fit(start, {})
    first = {k: v.clone() for k, v in client.encoder.feedback.residuals.items()}
    client.fit(start, {})
    assert any(not torch.equal(first[k], v) for k, v in client.encoder.feedback.residuals.items())
    _, n, metrics = client.evaluate(start, {})
    assert n == 40 and 0 <= metrics["accuracy"] <= 1
    assert [a.shape for a in client.get_parameters({})] == [a.shape for a in start]
    with pytest.raises(ValueError, match="arrays"):
        client.fit(start[:-1], {})


def test_user_loop_in_the_client():
    calls = []

    def my_loop(model, loader, *, round, client):
        calls.append((round, client))

    client = SparseClient(_model(), _data(0), local_train=my_loop, client_id=4)
    arrays, n, _ = client.fit(model_to_ndarrays(_model()), {"server_round": 2})
    assert calls == [(2, 4)] and n == 40
    assert all(a.dtype == np.uint8 for a in arrays)  # an all-zero update still travels as messages


def test_missing_flower_raises_a_clear_import_error(monkeypatch):
    for name in [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "sparsenn.federated.flower")
    with pytest.raises(ImportError, match=r"pip install sparsenn\[federated\]"):
        importlib.import_module("sparsenn.federated.flower")
