"""The calibrated ensemble: `model` (inference: members' normalised scores and maps,
averaged) and `fit` (each member fitted, then normalised on held-out OK images)."""
