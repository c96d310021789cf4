"""Errors a user can cause.

A :class:`UserError` carries one sentence that says what was wrong and what to
do. The command line prints it on one line and exits with status 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line before work starts."""


class DataError(UserError):
    """A data set that cannot be used (missing, empty, too short, no text column)."""


class ModelError(UserError):
    """A model path or folder that cannot be used."""
