"""The one error type users see: a short message saying what is wrong and what to do."""


class MxqnError(Exception):
    """Bad input or an impossible request. The CLI prints the message on one line, exit code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty),
    for one-line errors that quote a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
