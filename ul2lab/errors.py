"""The one error type the user sees: a problem with their input, config or files.

Every library error meant for the user (bad settings, an unreadable checkpoint, a model directory
of another format, a run that stopped itself) subclasses UserError; `ul2lab` prints it as one
plain line and exits 2. Anything else is a bug and keeps its traceback. Imports nothing.
"""


class UserError(Exception):
    """A problem with the user's input or config, said in one line that names the input and the fix."""
