"""The errors that mean "bad input the user can fix", below every part that raises them: the model
loader and the training engine both raise ``CheckpointError``, and a command line (``cli.common.run_main``)
prints any ``InputError`` as one ``error:`` line with exit status 2 instead of a traceback, without
importing the wings that define the particular kinds."""

from __future__ import annotations


class InputError(Exception):
    """A file, flag or folder that cannot be used as given; the message says what and what to do."""


class CheckpointError(InputError, RuntimeError):
    """A checkpoint file or weight folder that cannot be used, with the reason (one line)."""
