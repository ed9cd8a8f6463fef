"""User-facing errors.

A `QuantshipError` carries one line that names the problem and the fix. The CLI prints it
without a traceback and exits with code 2; anything else escaping is a bug in quantship.
"""


class QuantshipError(Exception):
    """Bad input or an impossible request, explained in one line."""

    exit_code = 2
