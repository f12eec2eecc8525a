"""The one exception type the command line turns into a one-line error message."""


class NinError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
