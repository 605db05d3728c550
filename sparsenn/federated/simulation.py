"""In-process federated averaging with compressed messages and exact byte counts, for tests and benchmarks.

FedAvg (McMahan et al. 2017): each round the server sends the model to the participating
clients, each trains locally and sends its update (``local - global``), and the server adds the
average of the updates weighted by the clients' sample counts. Every exchange here is a real
:class:`~sparsenn.federated.messages.Message` whose bytes are counted and decoded by the
receiver's checked decoder, so ``bytes_up``/``bytes_down`` are what a deployment would send,
headers included (no transport framing).

* **Up**: one message per shared tensor (:mod:`~sparsenn.federated.model_state`) through the
  client's :class:`~sparsenn.federated.updates.UpdateEncoder` (``compressor``, with error
  feedback per client when it is biased, or as ``error_feedback`` says).
* **Down**: ``downlink="dense"`` sends every participant the whole model each round. Any
  compressor instead broadcasts the server's averaged update, compressed with the server's own
  error feedback (STC compresses both ways, Sattler et al. 2019); the server applies exactly what
  it sends, so a client that holds the previous model gets the same new one. A client that does
  not (first round, missed rounds, or a ``server_step`` that changed the model or its masks) gets
  the whole model instead.
* **Server-fixed masks**: masks on the model ``model_fn`` returns (pruned by any method of the
  library) are known to both sides: sent once as masks (again if ``server_step`` changes them),
  after that only kept entries travel, and clients train under them
  (:func:`~sparsenn.federated.model_state.fixed_mask_sparsifier`).
* **The user's loop**: ``local_train(model, loader, round=, client=)`` replaces the built-in SGD
  (it must keep masked weights at 0, e.g. by wrapping its optimizer); ``server_step(model, round)``
  runs after each aggregation (server-side pruning, a learning-rate schedule, ...).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.masks import masked_parameters
from ..train.loop import evaluate, train
from .compressors import Dense
from .messages import Message
from .model_state import (
    fixed_mask_sparsifier,
    get_state,
    load_state,
    server_masks,
    state_update,
)
from .updates import UpdateEncoder, decode_update, encode_masks

__all__ = ["RoundLog", "SimulationResult", "sgd_local_train", "simulate"]


@dataclass
class RoundLog:
    """One round: who took part, the bytes sent up and down (all clients), the test accuracy."""

    round: int
    clients: list[int]
    bytes_up: int
    bytes_down: int
    accuracy: float | None
    seconds: float


@dataclass
class SimulationResult:
    model: nn.Module  # the final global model (with its masks)
    rounds: list[RoundLog] = field(default_factory=list)
    bytes_up_per_client: list[int] = field(default_factory=list)
    bytes_down_per_client: list[int] = field(default_factory=list)

    @property
    def bytes_up(self) -> int:
        return sum(self.bytes_up_per_client)

    @property
    def bytes_down(self) -> int:
        return sum(self.bytes_down_per_client)

    @property
    def accuracy(self) -> float | None:
        """The last evaluated accuracy."""
        return next((r.accuracy for r in reversed(self.rounds) if r.accuracy is not None), None)

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": [asdict(r) for r in self.rounds], "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "bytes_up_per_client": self.bytes_up_per_client, "bytes_down_per_client": self.bytes_down_per_client}


def sgd_local_train(model: nn.Module, loader, *, epochs: int, lr: float, momentum: float = 0.0,
                    weight_decay: float = 0.0) -> list[float]:
    """Plain SGD for ``epochs`` with the library's loop; a masked model trains under its fixed masks."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sp = fixed_mask_sparsifier(model) if masked_parameters(model) else None
    if sp is not None:
        opt = sp.wrap(opt)
    return train(model, loader, opt, epochs=epochs, sparsifier=sp)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_args(client_datasets, rounds, local_epochs, lr, clients_per_round, evaluate_every) -> int:
    if not isinstance(client_datasets, Sequence) or not client_datasets:
        raise ValueError("client_datasets must be a non-empty sequence of datasets, one per client")
    for i, d in enumerate(client_datasets):
        if len(d) == 0:
            raise ValueError(f"client {i} has no samples")
    _positive_int("rounds", rounds)
    _positive_int("evaluate_every", evaluate_every)
    if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 0:
        raise ValueError(f"local_epochs must be a non-negative integer, got {local_epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    n = len(client_datasets)
    per_round = n if clients_per_round is None else clients_per_round
    if isinstance(per_round, bool) or not isinstance(per_round, int) or not 1 <= per_round <= n:
        raise ValueError(f"clients_per_round must be an integer in [1, {n}], got {clients_per_round!r}")
    return per_round


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) != sorted(b) or any(not torch.equal(a[n], b[n]) for n in a)


def simulate(model_fn: Callable[[], nn.Module], client_datasets: Sequence[Dataset], *, rounds: int,
             test_data: Dataset | DataLoader | None = None, local_epochs: int = 1, lr: float = 0.05,
             momentum: float = 0.0, weight_decay: float = 0.0, batch_size: int = 32,
             compressor: Any = "dense", error_feedback: bool | None = None, downlink: Any = "dense",
             downlink_error_feedback: bool | None = None, clients_per_round: int | None = None,
             local_train: Callable | None = None, server_step: Callable[[nn.Module, int], None] | None = None,
             on_message: Callable[[str, int, int, str, Message], None] | None = None,
             on_round: Callable[[RoundLog], None] | None = None, evaluate_every: int = 1,
             seed: int = 0) -> SimulationResult:
    """Run ``rounds`` of FedAvg in this process; see the module doc.

    ``model_fn()`` builds the initial global model (its masks are the server's fixed masks).
    ``compressor`` / ``downlink``: a name (``sparsenn.federated.list_compressors()``), a dict or a
    :class:`~sparsenn.federated.compressors.Compressor`; ``downlink="dense"`` sends the whole model.
    ``on_message(direction, round, client, name, message)`` sees every message (``"up"``/``"down"``,
    a download once per receiving client); ``on_round(log)`` every :class:`RoundLog`.
    """
    per_round = _check_args(client_datasets, rounds, local_epochs, lr, clients_per_round, evaluate_every)
    n_clients = len(client_datasets)
    model = model_fn()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
    encoders = [UpdateEncoder(compressor, error_feedback=error_feedback) for _ in range(n_clients)]
    dense_down = isinstance(downlink, str) and downlink.lower() in ("dense", "none")
    server_encoder = None if dense_down else UpdateEncoder(downlink, error_feedback=downlink_error_feedback)
    test_loader = (test_data if isinstance(test_data, DataLoader) or test_data is None
                   else DataLoader(test_data, batch_size=1000))
    weights = [len(d) for d in client_datasets]
    gen = torch.Generator().manual_seed(seed)

    state, masks = get_state(model), server_masks(model)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    version, mask_version, broadcast = 0, 0, None  # broadcast: (from_version, {name: Message})
    have_state, have_masks = [-1] * n_clients, [-1] * n_clients
    result = SimulationResult(model, [], [0] * n_clients, [0] * n_clients)

    def send(direction: str, t: int, c: int, messages: dict[str, Message]) -> int:
        for name, m in messages.items():
            if on_message is not None:
                on_message(direction, t, c, name, m)
        total = sum(m.nbytes for m in messages.values())
        (result.bytes_up_per_client if direction == "up" else result.bytes_down_per_client)[c] += total
        return total

    for t in range(1, rounds + 1):
        start = time.perf_counter()
        clients = sorted(torch.randperm(n_clients, generator=gen)[:per_round].tolist())
        cache: dict[str, dict[str, Message]] = {}  # this round's whole model and masks, encoded once
        up = down = 0
        total_weight = sum(weights[c] for c in clients)
        aggregate = {n: torch.zeros(s, dtype=torch.float64) for n, s in shapes.items()}
        for c in clients:
            if masks and have_masks[c] != mask_version:
                if "masks" not in cache:
                    cache["masks"] = encode_masks(masks)
                down += send("down", t, c, cache["masks"])
            if broadcast is not None and have_state[c] == broadcast[0]:
                down += send("down", t, c, broadcast[1])  # the previous round's compressed update
            else:
                if "model" not in cache:
                    cache["model"] = {n: Dense().compress(state[n], mask=masks.get(n)) for n in state}
                down += send("down", t, c, cache["model"])
            have_state[c], have_masks[c] = version, mask_version

            local = copy.deepcopy(model)  # the model the client now holds (masks included)
            loader = DataLoader(client_datasets[c], batch_size=batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed((seed * 1_000_003 + t) * 1_000_003 + c))
            if local_train is None:
                sgd_local_train(local, loader, epochs=local_epochs, lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
            else:
                local_train(local, loader, round=t, client=c)
            update = state_update(get_state(local), state, masks)
            messages = encoders[c].encode(update, masks)
            up += send("up", t, c, messages)
            received = decode_update({n: m.data for n, m in messages.items()}, shapes, masks)
            for n, u in received.items():
                aggregate[n] += u.double() * (weights[c] / total_weight)

        if server_encoder is None:
            new_state = {n: (state[n].double() + aggregate[n]).to(state[n].dtype) for n in state}
            broadcast = None
        else:  # a client holding this version gets the next one from these messages, the same arithmetic
            messages = server_encoder.encode(aggregate, masks)
            sent = decode_update({n: m.data for n, m in messages.items()}, shapes, masks)
            new_state = {n: state[n] + sent[n].to(state[n].dtype) for n in state}
            broadcast = (version, messages)
        load_state(model, new_state)
        state, version = get_state(model), version + 1

        if server_step is not None:
            server_step(model, t)
            new_masks, new_state = server_masks(model), get_state(model)
            if _changed(new_masks, masks):  # the broadcast was encoded relative to the old masks
                masks, mask_version, broadcast = new_masks, mask_version + 1, None
            if _changed(new_state, state):
                state, version, broadcast = new_state, version + 1, None

        accuracy = None
        if test_loader is not None and (t % evaluate_every == 0 or t == rounds):
            accuracy = evaluate(model, test_loader)
        log = RoundLog(t, clients, up, down, accuracy, time.perf_counter() - start)
        result.rounds.append(log)
        if on_round is not None:
            on_round(log)
    return result
