class SaguaroError(ValueError):
    """A bad argument or configuration. The message names the field and the fix."""


class DraftFailure(RuntimeError):
    """The drafter crashed or timed out; its sequences continue on the target alone."""


class Unavailable(RuntimeError):
    """The server cannot take or finish the request now; the client may retry it (Triton
    UNAVAILABLE, HTTP 503)."""


class PeerUnavailable(Unavailable):
    """An engine process is gone or not answering; it is being restarted."""


class ServerBusy(Unavailable):
    """Every KV slot is in use and the admission queue is full."""
