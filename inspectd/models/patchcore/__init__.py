"""PatchCore: `model` (inference), `fit` (the memory bank), and its own numerics:
`coreset` (the approximate greedy sampler) and `knn` (the nearest-neighbour index)."""
