"""rtsvc: real-time streaming voice conversion with RIFT-SVC models."""

__version__ = "0.1.0"
