"""Errors a user can act on: the CLI prints them as one line, never a traceback."""


class RdquantError(Exception):
    """A problem with the user's input or environment, phrased so they can fix it."""


class ArtifactError(RdquantError):
    """A compressed artifact is missing, truncated, corrupted or of an unknown format."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): for one-line errors that
    wrap what a library raised."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
