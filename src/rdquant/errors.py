"""Errors a user can act on: the CLI prints them as one line, never a traceback."""


class RdquantError(Exception):
    """A problem with the user's input or environment, phrased so they can fix it."""


class ArtifactError(RdquantError):
    """A compressed artifact is missing, truncated, corrupted or of an unknown format."""
