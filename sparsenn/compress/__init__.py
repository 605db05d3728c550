"""Compression and interchange (layer 6): Deep Compression, the sparse archive, export and import.

A sparse model leaves the training process small and comes back exactly, in files other
tools and other people can read:

- :mod:`.deep_compression` (with :mod:`.weight_sharing`, :mod:`.relative_index`, :mod:`.huffman`):
  weight sharing by k-means, Huffman coding and relative indices (Han et al. 2016), byte-exact sizes;
- :mod:`.archive` (with :mod:`.codecs`, :mod:`.manifest`): the ``.sparsenn`` archive (safetensors
  payloads + a JSON manifest, no pickle), safe to open from a stranger;
- :mod:`.compressed_tensors`: a reader for the "sparse-bitmask" checkpoints of compressed-tensors;
- :mod:`.onnx_export` (with :mod:`.onnx_sparse`): ONNX export with ``sparse_initializer``s. It needs
  the optional ``onnx`` package, so it is imported on first use (``sparsenn.export_onnx``).
"""

from . import archive
from .compressed_tensors import load_compressed_tensors, read_sparse_bitmask
from .deep_compression import DeepCompressed, deep_compress

__all__ = ["DeepCompressed", "archive", "deep_compress", "load_compressed_tensors", "read_sparse_bitmask"]
