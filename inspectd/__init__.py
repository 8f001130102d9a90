"""inspectd: production-line visual inspection with unsupervised anomaly models."""

__version__ = "0.1.0"
