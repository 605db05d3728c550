"""Ways to create sparsity: pruning criteria, dynamic sparse training, sparse
initialization, pruning procedures (IMP, lottery tickets) and regularization."""
