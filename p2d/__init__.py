"""p2d: find the attention heads that matter for a domain, mine the data they respond to, train only them."""

__version__ = "0.1.0"


class P2DError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""
