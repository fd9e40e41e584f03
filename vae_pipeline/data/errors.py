from vae_pipeline.errors import TransientError, UserError


class DataError(UserError):
    """A data source or prepared dataset that cannot be used; the message names it and the fix."""


class SourceUnreachable(TransientError, DataError):
    """The source's endpoint did not answer: transient, worth retrying (unlike bad input); a
    DataError too, so the data step's callers see one kind of data failure."""


class NoImages(DataError):
    """A source that holds no usable image (empty, or every file refused)."""
