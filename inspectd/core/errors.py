"""The project's exception types.

Expected failures (bad input, missing weights, broken artifacts) are `InspectdError`s: the
CLI prints their message as one line and exits non-zero, without a traceback.
"""


class InspectdError(Exception):
    """An expected error whose message is meant for the user."""


class ConfigError(InspectdError):
    """A setting is unknown or has an invalid value."""


class DataError(InspectdError):
    """An input image, mask or data set is missing, unreadable or malformed."""


class WeightsNotFoundError(InspectdError):
    """Backbone weights are needed but no local file holds them."""


class ArtifactError(InspectdError):
    """A model artifact is missing, incomplete or inconsistent."""
