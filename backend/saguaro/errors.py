class SaguaroError(ValueError):
    """A bad argument or configuration. The message names the field and the fix."""


class DraftFailure(RuntimeError):
    """The drafter crashed or timed out; its sequences continue on the target alone."""
