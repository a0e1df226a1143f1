"""tagd: a streaming, real-time music auto-tagger for broadcast."""

__version__ = "0.1.0"
