"""The exceptions multitoken raises, each also a builtin one where that fits."""


class Error(Exception):
    """Base of every error multitoken raises (a model that fails to load, a generation
    that fails); the message is the one the `multitoken` CLI prints."""


class InputError(Error, ValueError):
    """Bad input: an item of the wrong kind, shape or mode, an unknown option, a prompt
    whose modality tokens do not match its items."""


class NotFoundError(Error, FileNotFoundError):
    """A file, model directory or hub id that is not there (offline and not cached)."""
