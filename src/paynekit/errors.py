"""Exceptions raised by paynekit. Every message names the argument or file and what was expected."""


class PaynekitError(Exception):
    """Base class for errors raised by paynekit."""


class InputError(PaynekitError, ValueError):
    """An argument or input array does not have the expected shape, dtype or values."""


class FileFormatError(PaynekitError, ValueError):
    """A file is not of a layout or version that paynekit can read."""


class NotFittedError(PaynekitError, RuntimeError):
    """A trainable object was used before ``fit`` was called."""
