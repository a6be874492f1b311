"""The error every bad configuration raises: its message names the problem and the fix."""


class PeftConfigError(ValueError):
    """A configuration that cannot be built; the message says what is wrong and how to fix it."""
