class DataError(RuntimeError):
    """A data source or prepared dataset that cannot be used; the message names it and the fix."""
