"""Making sparsity pay: exact storage formats, CPU kernels, the inference runtime
(``sparsenn.convert``) and whole-model measurement."""
