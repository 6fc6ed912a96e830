"""User-facing errors: one exception type whose message is a full sentence for the terminal."""


class RankwiseError(Exception):
    """A problem with the user's input (paths, data, adapters, flags), worded for the terminal.

    The CLI prints ``str(err)`` on one line and exits with status 2; anything else is a bug
    and keeps its traceback.
    """
