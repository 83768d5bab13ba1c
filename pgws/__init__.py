"""pgws: WebSockets on top of PostgreSQL LISTEN/NOTIFY."""

__version__ = "0.1.0"
