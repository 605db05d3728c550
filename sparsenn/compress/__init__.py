"""Compression and interchange (layer 6): Deep Compression, the sparse archive, export and import.

A sparse model leaves the training process small and comes back exactly, in files other
tools and other people can read:

- ``deep_compression``: weight sharing (k-means), Huffman coding and relative indices
  (Han et al. 2016), with byte-exact sizes;
- ``archive``: the ``.sparsenn`` archive (safetensors payloads + a JSON manifest, no pickle),
  safe to open from a stranger;
- ``compressed_tensors``: a reader for the "sparse-bitmask" checkpoints of compressed-tensors;
- ``onnx_export``: ONNX export with ``sparse_initializer``s.
"""
