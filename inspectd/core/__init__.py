"""The vocabulary every other package shares: wire types and their validation, the line
configuration, errors, the settings base, image I/O, logging and CPU budgets. It imports
nothing else of inspectd."""
