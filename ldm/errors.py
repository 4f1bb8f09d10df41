"""User-facing errors. The CLI prints their message and exits non-zero, never a traceback."""


class LdmError(Exception):
    """Base of every error caused by the user's input rather than a bug in ldm."""


class ConfigError(LdmError):
    """A config.json field ldm does not understand or does not support."""


class LoadError(LdmError):
    """A model file or folder that is missing, corrupt, refused (pickle) or does not match its config."""


class InputError(LdmError):
    """An out-of-range or malformed generation parameter. `field`: the `GenerationRequest` field at fault, where
    there is one (the scoring adapter names its own parameter for it)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
