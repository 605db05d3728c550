"""In-process FedAvg (sparsenn.federated.simulate), client splits, server-fixed masks."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sparsenn as sn
from sparsenn.core.masks import get_masks
from sparsenn.federated import (
    TopK,
    classes_per_client_split,
    client_datasets,
    fixed_mask_sparsifier,
    get_state,
    iid_split,
    simulate,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=240, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    y = (x @ torch.randn(12, 4, generator=g)).argmax(1)
    return TensorDataset(x, y), y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _sparse_model():
    model = _model()
    sn.Sparsifier(model, sparsity=0.75)  # magnitude, one shot: the server's fixed masks
    return model


def _clients(k=4):
    data, _ = _data()
    return client_datasets(data, iid_split(len(data), k, seed=0)), data


class Recorder:
    def __init__(self):
        self.messages = []

    def __call__(self, direction, round_, client, name, message):
        self.messages.append((direction, round_, client, name, message))

    def total(self, direction, client=None):
        return sum(m.nbytes for d, _, c, _, m in self.messages if d == direction and client in (None, c))


@pytest.mark.parametrize("kw", [
    {},
    {"compressor": {"name": "topk", "fraction": 0.1}},
    {"compressor": "stc", "downlink": "stc"},
    {"compressor": TopK(0.2), "downlink": {"name": "topk", "fraction": 0.2}, "clients_per_round": 2},
])
def test_two_rounds_byte_totals_equal_the_messages(kw):
    clients, data = _clients()
    rec = Recorder()
    result = simulate(_model, clients, rounds=2, test_data=data, lr=0.1, on_message=rec, **kw)
    assert len(result.rounds) == 2 and all(0 <= r.accuracy <= 1 for r in result.rounds)
    assert result.bytes_up == rec.total("up") and result.bytes_down == rec.total("down")
    for c in range(len(clients)):
        assert result.bytes_up_per_client[c] == rec.total("up", c)
        assert result.bytes_down_per_client[c] == rec.total("down", c)
    for r in result.rounds:
        assert r.bytes_up == sum(m.nbytes for d, t, _, _, m in rec.messages if d == "up" and t == r.round)
        assert r.bytes_down == sum(m.nbytes for d, t, _, _, m in rec.messages if d == "down" and t == r.round)
    assert all(m.nbytes == len(m.data) for *_, m in rec.messages)


def test_dense_fedavg_is_the_weighted_mean_of_client_models():
    """One round, dense: the new global model is global + sum_k n_k / n * (local_k - global), computed here
    by training copies of the model the same way (same loader seeds)."""
    data, _ = _data(n=100)
    splits = [torch.arange(0, 30), torch.arange(30, 100)]
    clients = client_datasets(data, splits)
    result = simulate(_model, clients, rounds=1, lr=0.1, seed=7)
    start = get_state(_model())
    expected = {n: t.double().clone() for n, t in start.items()}
    for c, part in enumerate(clients):
        local = _model()
        loader = torch.utils.data.DataLoader(part, batch_size=32, shuffle=True, generator=torch.Generator()
                                             .manual_seed((7 * 1_000_003 + 1) * 1_000_003 + c))
        sn.federated.sgd_local_train(local, loader, epochs=1, lr=0.1)
        for n, t in get_state(local).items():
            expected[n] += (t - start[n]).double() * (len(part) / 100)
    got = get_state(result.model)
    for n, value in expected.items():
        assert torch.equal(got[n], value.float())


def test_server_fixed_mask_model_stays_exactly_masked():
    clients, data = _clients()
    model_masks = get_masks(_sparse_model())
    rec = Recorder()
    result = simulate(_sparse_model, clients, rounds=2, test_data=data, lr=0.1, on_message=rec,
                      compressor="dense")
    masks = get_masks(result.model)
    assert masks.keys() == model_masks.keys()
    for name, mask in masks.items():
        assert torch.equal(mask, model_masks[name])
        weight = result.model.get_parameter(name)
        assert torch.equal(weight[~mask], torch.zeros(int((~mask).sum())))  # exact +0.0
        assert not bool(torch.signbit(weight[~mask]).any())
        assert bool((weight[mask] != 0).any())  # it did train
    ups = [(n, m) for d, _, _, n, m in rec.messages if d == "up"]
    for name, m in ups:  # only the kept values travel, no index
        if name in masks:
            assert m.masked and m.index == "all" and m.count == int(masks[name].sum())
    mask_messages = [m for d, _, _, _, m in rec.messages if d == "down" and m.mask_only]
    assert len(mask_messages) == len(clients) * len(masks)  # each client gets the masks once


def test_sparse_model_costs_its_kept_values():
    clients, _ = _clients()
    dense = simulate(_model, clients, rounds=1, lr=0.1)
    sparse = simulate(_sparse_model, clients, rounds=1, lr=0.1)
    assert sparse.bytes_up < 0.5 * dense.bytes_up


def test_client_moving_a_masked_weight_is_refused():
    clients, _ = _clients()

    def careless(model, loader, *, round, client):  # trains without wrapping its optimizer
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():  # and writes straight into a masked position
            model[0].weight.add_(1.0)

    with pytest.raises(ValueError, match="outside the server's mask"):
        simulate(_sparse_model, clients, rounds=1, local_train=careless)


@pytest.mark.parametrize("downlink", ["dense", {"name": "topk", "fraction": 0.3}])
def test_users_loop_with_fixed_masks_and_server_side_pruning(downlink):
    """The user's local loop (wrapping its optimizer) and a server step that prunes further: the new masks are
    sent again, and the model stays masked."""
    clients, _ = _clients()
    calls = []

    def my_loop(model, loader, *, round, client):
        calls.append((round, client))
        opt = fixed_mask_sparsifier(model).wrap(torch.optim.Adam(model.parameters(), lr=1e-2))
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def prune_more(model, round_):
        if round_ == 1:
            sp = fixed_mask_sparsifier(model)
            sp.update(0.9)

    rec = Recorder()
    result = simulate(_sparse_model, clients, rounds=2, local_train=my_loop, server_step=prune_more,
                      on_message=rec, downlink=downlink)
    assert calls == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    masks = get_masks(result.model)
    assert [int(m.sum()) for m in masks.values()] == [round(0.1 * m.numel()) for m in masks.values()]
    for name, mask in masks.items():
        assert not bool(result.model.get_parameter(name)[~mask].any())
    per_round = [sum(1 for d, t, _, _, m in rec.messages if d == "down" and m.mask_only and t == r) for r in (1, 2)]
    assert per_round == [len(clients) * len(masks)] * 2  # masks sent at the start and again after pruning
    for name, m in [(n, m) for d, t, _, n, m in rec.messages if d == "down" and t == 2 and not m.mask_only]:
        assert m.index == "all" and (name not in masks or m.count == int(masks[name].sum()))  # the whole model


def test_compressed_downlink_broadcast_or_whole_model():
    """A client that holds the previous round's model gets the compressed broadcast; any other the whole model."""
    clients, _ = _clients()
    rec = Recorder()
    result = simulate(_model, clients, rounds=4, downlink={"name": "topk", "fraction": 0.05}, on_message=rec,
                      clients_per_round=2, seed=1)
    numel = {n: t.numel() for n, t in get_state(_model()).items()}
    previous, seen = set(), set()
    for log in result.rounds:
        for c in log.clients:
            got = {n: m for d, t, cc, n, m in rec.messages if d == "down" and t == log.round and cc == c}
            assert got.keys() == numel.keys()
            if c in previous:
                assert all(m.count == max(1, round(0.05 * numel[n])) for n, m in got.items())
            else:
                assert all(m.index == "all" and m.count == numel[n] for n, m in got.items())
            seen.add(c in previous)
        previous = set(log.clients)
    assert seen == {True, False}


def test_splits():
    labels = torch.arange(600) % 10
    splits = classes_per_client_split(labels, 20, 2, seed=3)
    assert torch.equal(torch.cat(splits).sort().values, torch.arange(600))  # a partition
    for s in splits:
        assert len(set(labels[s].tolist())) == 2
    assert [len(s) for s in splits] == [30] * 20
    again = classes_per_client_split(labels, 20, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(splits, again))
    iid = iid_split(103, 10, seed=0)
    assert sorted(len(s) for s in iid) == [10] * 7 + [11] * 3
    assert torch.equal(torch.cat(iid).sort().values, torch.arange(103))
    with pytest.raises(ValueError, match="only 10 classes"):
        classes_per_client_split(labels, 5, 11)
    with pytest.raises(ValueError, match="num_clients"):
        iid_split(10, 0)


def test_arguments_checked():
    clients, _ = _clients()
    with pytest.raises(ValueError, match="rounds"):
        simulate(_model, clients, rounds=0)
    with pytest.raises(ValueError, match="clients_per_round"):
        simulate(_model, clients, rounds=1, clients_per_round=9)
    with pytest.raises(ValueError, match="non-empty"):
        simulate(_model, [], rounds=1)
    with pytest.raises(sn.core.registry.UnknownNameError, match="valid compressors"):
        simulate(_model, clients, rounds=1, compressor="topq")


def test_dynamic_sparse_training_on_clients_with_server_side_pruning():
    """No fixed server mask: each client runs SET from the global model's zeros (init="magnitude") in its own
    loop, the average is pruned back to 75% on the server (FedDST-like, Bibikar et al. 2022)."""
    def model_fn():
        model = _model()
        sn.Sparsifier(model, sparsity=0.75).finalize()  # exact zeros, no masks
        return model

    def dst_loop(model, loader, *, round, client):
        sp = sn.Sparsifier(model, sparsity=0.75, method="set", init="magnitude", total_steps=len(loader),
                           update_every=2, seed=client)
        sn.train.train(model, loader, sp.wrap(torch.optim.SGD(model.parameters(), lr=0.1)), sparsifier=sp)
        sp.finalize()

    def prune_back(model, round_):
        sn.Sparsifier(model, sparsity=0.75).finalize()

    clients, data = _clients()
    result = simulate(model_fn, clients, rounds=2, local_train=dst_loop, server_step=prune_back,
                      compressor={"name": "topk", "fraction": 0.5}, test_data=data)
    for layer in (result.model[0], result.model[2]):
        assert int((layer.weight == 0).sum()) == round(0.75 * layer.weight.numel())
    assert 0 <= result.accuracy <= 1
