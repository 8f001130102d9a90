"""PaDiM and OrthoAD: `model` (inference) and `fit` (the embedding matrix, random channel
subset or semi-orthogonal, and the Gaussians)."""
