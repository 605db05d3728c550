"""Training with sparse weights on the CPU (SparseProp, Nikdan et al. 2023): kernels for the forward
product, the input gradient and the weight gradient at the active positions only
(:mod:`.kernels`), their ``torch.autograd.Function`` (:mod:`.function`) and a Linear layer
holding only the active values (:mod:`.layer`)."""

from .function import SparseLinearFunction, sparse_linear
from .kernels import SparseStructure
from .layer import SparseTrainingLinear
from .swap import SparseLinearBackend  # registers backend="sparse" for the Sparsifier

__all__ = ["SparseLinearBackend", "SparseLinearFunction", "SparseStructure", "SparseTrainingLinear", "sparse_linear"]
