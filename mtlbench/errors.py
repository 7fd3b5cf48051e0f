"""The one exception type for bad user input; the CLI prints it as one line, exit status 2."""


class MtlbenchError(ValueError):
    """A problem the user can fix: bad option, unknown name, missing file."""
