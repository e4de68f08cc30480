"""User-facing errors: one line that names the problem and the fix; the CLI exits with code 2."""


class DLMError(Exception):
    """An error caused by user input (bad file, bad flag, bad checkpoint). Printed without traceback."""

    exit_code = 2


class MissingSplitError(DLMError):
    """The data has no split of the requested name (callers may fall back, e.g. to a hold-out)."""
