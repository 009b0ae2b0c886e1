"""The one error type users see: a short message saying what is wrong and what to do."""


class MxqnError(Exception):
    """Bad input or an impossible request. The CLI prints the message on one line, exit code 2."""
