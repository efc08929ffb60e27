"""Error types that map to the CLI's exit codes (docs/DESIGN.md: 2 = bad input, 1 = internal)."""


class QtoolError(Exception):
    """Bad input from the user: the CLI prints one line and exits 2."""
