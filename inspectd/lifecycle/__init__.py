"""The model lifecycle: the per-SKU registry of versions (`current`, promote, rollback,
history), refit from the line's OK frames, its promotion gates and lock, and drift."""
