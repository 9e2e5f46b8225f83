"""The one error type for bad input: the CLI prints its message on one line and exits with status 2."""


class VlsafeError(Exception):
    """Bad input (a file, record, field, spec or value) named in one line."""
