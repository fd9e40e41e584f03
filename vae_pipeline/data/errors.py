class DataError(RuntimeError):
    """A data source or prepared dataset that cannot be used; the message names it and the fix."""


class SourceUnreachable(DataError):
    """The source's endpoint did not answer: transient, worth retrying (unlike bad input)."""


class NoImages(DataError):
    """A source that holds no usable image (empty, or every file refused)."""
