"""Federated learning with sparse communication (layer 3: imports core, data, models, train).

Compressed client updates (dense, top-k, random-k, Sparse Ternary Compression) with error
feedback whose conservation is exact, messages with exact byte counts and a hostile-input
decoder, sparse models whose masks the server fixes, IID and classes-per-client splits, an
in-process FedAvg simulation (:func:`simulate`) and a Flower adapter
(``sparsenn.federated.flower``, imported on demand: ``pip install sparsenn[federated]``).
"""

from .compressors import (
    COMPRESSORS,
    STC,
    Compressor,
    Dense,
    RandomK,
    TopK,
    list_compressors,
    make_compressor,
)
from .error_feedback import ErrorFeedback
from .messages import (
    Message,
    MessageError,
    decode,
    decode_mask,
    encode,
    encode_mask,
    encode_ternary,
    parse,
)
from .model_state import (
    fixed_mask_sparsifier,
    get_state,
    load_state,
    server_masks,
    shared_names,
    state_update,
)
from .partition import classes_per_client_split, client_datasets, iid_split
from .simulation import RoundLog, SimulationResult, sgd_local_train, simulate
from .updates import UpdateEncoder, decode_update, encode_masks

__all__ = [
    "COMPRESSORS",
    "STC",
    "Compressor",
    "Dense",
    "ErrorFeedback",
    "Message",
    "MessageError",
    "RandomK",
    "RoundLog",
    "SimulationResult",
    "TopK",
    "UpdateEncoder",
    "classes_per_client_split",
    "client_datasets",
    "decode",
    "decode_mask",
    "decode_update",
    "encode",
    "encode_mask",
    "encode_masks",
    "encode_ternary",
    "fixed_mask_sparsifier",
    "get_state",
    "iid_split",
    "list_compressors",
    "load_state",
    "make_compressor",
    "parse",
    "server_masks",
    "sgd_local_train",
    "shared_names",
    "simulate",
    "state_update",
]
