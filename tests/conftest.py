import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def data_dir() -> Path:
    """The folder holding the real ``mnist/`` and ``fashion_mnist/`` IDX files: ``$SPARSENN_DATA_DIR``,
    else ``../shared/datasets`` beside the checkout."""
    env = os.environ.get("SPARSENN_DATA_DIR")
    return Path(env).expanduser() if env else ROOT.parent / "shared" / "datasets"


DATA_DIR = data_dir()


def _missing(names: tuple[str, ...]) -> str | None:
    gone = [n for n in names if not (DATA_DIR / n).is_dir()]
    if not gone:
        return None
    return (f"{' and '.join(gone)} not found in {DATA_DIR} (set SPARSENN_DATA_DIR to the folder holding "
            f"{', '.join(n + '/' for n in names)})")


def needs_datasets(*names: str):
    """Skip the test unless every dataset folder in ``names`` is in :data:`DATA_DIR`; the reason says where
    it looked and which variable points elsewhere."""
    reason = _missing(names)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def skip_unless_datasets(*names: str) -> Path:
    """:data:`DATA_DIR` if it holds every dataset in ``names``, else skip (for fixtures)."""
    reason = _missing(names)
    if reason:
        pytest.skip(reason)
    return DATA_DIR


def load_bench(name: str, file: str):
    """Import ``bench/FILE`` as module ``name`` (registered in sys.modules: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class TinyMLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_batches(n=4, batch=8, d_in=16, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g)) for _ in range(n)]


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return TinyMLP()


@pytest.fixture
def batches():
    return make_batches()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models: on a shared machine extra threads wait on busy cores,
    milliseconds per operation); the count is restored after. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def forge_runtime_archive(path, out, **metadata):
    """Write ``out``: the converted-model file at ``path`` with these metadata entries replaced (JSON-encoded)
    and the SHA-256 digest recomputed, as a forger would, so that only the checks of the entries can refuse it."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparsenn.backend.runtime.io import digest

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.update({k: json.dumps(v) for k, v in metadata.items()})
    meta["sha256"] = digest(tensors, meta)
    save_file(tensors, str(out), metadata=meta)
    return out
