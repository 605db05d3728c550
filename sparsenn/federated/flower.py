"""Flower (``flwr``) adapter: compressed client updates in a real federated deployment.

Flower runs the network, the client selection and the rounds; this module only changes what a
client sends and how the server reads it:

* :class:`SparseClient`, a ``flwr.client.NumPyClient``: ``fit`` loads the global model, trains
  locally (the built-in SGD or the user's ``local_train``), and returns its update as one
  ``uint8`` array per shared tensor, each the bytes of a
  :class:`~sparsenn.federated.messages.Message` from its compressor (error feedback kept in the
  client object across rounds). A model with masks trains under them and sends kept entries only.
* :class:`SparseFedAvg`, a ``flwr.server.strategy.FedAvg``: ``aggregate_fit`` checks and decodes
  each client's messages (a client is hostile until checked: a result whose arrays or messages do
  not match the model is rejected, listed in ``rejected`` and left out of the average), adds the
  weighted average of the updates to the current global model and returns it.

The download is Flower's own (the global weights as float32 arrays). Importing this module needs
Flower: ``pip install sparsenn[federated]``. Tested with flwr 1.42 (the ``NumPyClient`` /
``Strategy`` API).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    from flwr.client import NumPyClient
    from flwr.common import (
        Parameters,
        log,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server.strategy import FedAvg
except ImportError as e:  # pragma: no cover - exercised by a test that hides flwr
    raise ImportError("sparsenn.federated.flower needs Flower (flwr): pip install sparsenn[federated]") from e

from ..train.loop import evaluate
from .messages import MessageError
from .model_state import get_state, load_state, server_masks, shared_names, state_update
from .simulation import sgd_local_train
from .updates import UpdateEncoder, decode_update

__all__ = ["SparseClient", "SparseFedAvg", "model_to_ndarrays"]


def model_to_ndarrays(model: nn.Module) -> list[np.ndarray]:
    """The shared state (:func:`~sparsenn.federated.model_state.shared_names` order) as NumPy arrays."""
    return [t.numpy() for t in get_state(model).values()]


def _load_ndarrays(model: nn.Module, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    names = shared_names(model)
    if len(arrays) != len(names):
        raise ValueError(f"got {len(arrays)} arrays for the model's {len(names)} shared tensors")
    state = {n: torch.as_tensor(np.asarray(a)).clone() for n, a in zip(names, arrays)}
    load_state(model, state)
    return get_state(model)


class SparseClient(NumPyClient):
    """A Flower client that trains ``model`` on ``train_data`` and sends compressed updates.

    ``compressor``/``error_feedback`` as in :class:`~sparsenn.federated.updates.UpdateEncoder`;
    ``local_train(model, loader, round=, client=)`` replaces the built-in SGD (``epochs``, ``lr``,
    ``momentum``, ``weight_decay``; the fit config's ``local_epochs`` and ``lr`` override them).
    """

    def __init__(self, model: nn.Module, train_data: Dataset, *, compressor: Any = "dense",
                 error_feedback: bool | None = None, test_data: Dataset | DataLoader | None = None,
                 local_train: Callable | None = None, epochs: int = 1, lr: float = 0.05, momentum: float = 0.0,
                 weight_decay: float = 0.0, batch_size: int = 32, client_id: int = 0, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model, self.train_data, self.test_data = model, train_data, test_data
        self.encoder = UpdateEncoder(compressor, error_feedback=error_feedback)
        self.local_train, self.client_id, self.seed = local_train, client_id, seed
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size = batch_size
        self.bytes_up = 0

    def get_parameters(self, config):
        return model_to_ndarrays(self.model)

    def fit(self, parameters, config):
        before = _load_ndarrays(self.model, parameters)
        masks = server_masks(self.model)
        round_ = int(config.get("server_round", 0)) if config else 0
        loader = DataLoader(self.train_data, batch_size=self.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed((self.seed * 1_000_003 + round_) * 1_000_003
                                                                    + self.client_id))
        if self.local_train is None:
            sgd_local_train(self.model, loader, epochs=int(config.get("local_epochs", self.epochs)),
                            lr=float(config.get("lr", self.lr)), momentum=self.momentum,
                            weight_decay=self.weight_decay)
        else:
            self.local_train(self.model, loader, round=round_, client=self.client_id)
        update = state_update(get_state(self.model), before, masks)
        messages = self.encoder.encode(update, masks)
        arrays = [np.frombuffer(m.data, dtype=np.uint8).copy() for m in messages.values()]
        sent = sum(m.nbytes for m in messages.values())
        self.bytes_up += sent
        return arrays, len(self.train_data), {"message_bytes": sent}

    def evaluate(self, parameters, config):
        _load_ndarrays(self.model, parameters)
        if self.test_data is None:
            return 0.0, 0, {}
        loader = self.test_data if isinstance(self.test_data, DataLoader) else DataLoader(self.test_data, 1000)
        n = sum(len(y) for _, y in loader)
        return 0.0, n, {"accuracy": evaluate(self.model, loader)}


def _uint8_payload(blob: bytes) -> bytes:
    """The data of a ``.npy`` blob holding one 1-D uint8 array, its header checked before anything is read."""
    f = io.BytesIO(blob)
    try:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, OSError) as e:
        raise MessageError(f"not a .npy array: {e}") from None
    payload = blob[f.tell():]
    if dtype != np.dtype(np.uint8) or len(shape) != 1 or shape[0] != len(payload):
        raise MessageError(f"expected a 1-D uint8 array of {len(payload)} bytes, got {dtype} {shape}")
    return payload


class SparseFedAvg(FedAvg):
    """FedAvg over compressed updates from :class:`SparseClient` (weighted by their sample counts).

    ``model``: the initial global model (the same class and masks as the clients'); other keyword
    arguments go to ``flwr.server.strategy.FedAvg``. ``rejected`` lists ``(round, reason)`` per
    refused result; ``bytes_up`` counts the accepted message bytes.
    """

    def __init__(self, model: nn.Module, **kwargs: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.names = shared_names(model)
        state = get_state(model)
        self.shapes = {n: tuple(t.shape) for n, t in state.items()}
        self.masks = server_masks(model)
        self.global_arrays = [t.numpy() for t in state.values()]
        kwargs.setdefault("initial_parameters", ndarrays_to_parameters(self.global_arrays))
        super().__init__(**kwargs)
        self.rejected: list[tuple[int, str]] = []
        self.bytes_up = 0

    def configure_fit(self, server_round, parameters, client_manager):
        self.global_arrays = parameters_to_ndarrays(parameters)  # the model these updates start from
        pairs = super().configure_fit(server_round, parameters, client_manager)
        for _, ins in pairs:
            ins.config.setdefault("server_round", server_round)
        return pairs

    def _decode(self, parameters: Parameters) -> tuple[dict[str, torch.Tensor], int]:
        if len(parameters.tensors) != len(self.names):
            raise MessageError(f"{len(parameters.tensors)} arrays for the model's {len(self.names)} shared tensors")
        messages = {n: _uint8_payload(b) for n, b in zip(self.names, parameters.tensors)}
        return decode_update(messages, self.shapes, self.masks), sum(len(m) for m in messages.values())

    def aggregate_fit(self, server_round, results, failures):
        if not results or (not self.accept_failures and failures):
            return None, {}
        accepted = []
        for _, res in results:
            try:
                if isinstance(res.num_examples, bool) or not isinstance(res.num_examples, int) \
                        or res.num_examples < 1:
                    raise MessageError(f"num_examples must be a positive integer, got {res.num_examples!r}")
                update, nbytes = self._decode(res.parameters)
                accepted.append((update, res.num_examples, nbytes))
            except MessageError as e:
                self.rejected.append((server_round, str(e)))
                log(WARNING, "SparseFedAvg: round %s: client result rejected: %s", server_round, e)
        if not accepted:
            return None, {"rejected": len(results)}
        total = sum(n for _, n, _ in accepted)
        new = []
        for name, current in zip(self.names, self.global_arrays):
            current = torch.as_tensor(np.asarray(current))
            avg = sum(u[name].double() * (n / total) for u, n, _ in accepted)
            value = (current.double() + avg).to(current.dtype)
            mask = self.masks.get(name)
            new.append((value if mask is None else value.masked_fill(~mask, 0)).numpy())
        self.global_arrays = new
        self.bytes_up += sum(b for _, _, b in accepted)
        return ndarrays_to_parameters(new), {"rejected": len(results) - len(accepted),
                                             "message_bytes": sum(b for _, _, b in accepted)}
