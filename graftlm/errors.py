"""The one exception type a user sees: the CLI prints its message as one line and exits non-zero."""


class GraftError(Exception):
    """A problem the user can act on (bad input, bad config, missing file, mismatched adapter)."""
