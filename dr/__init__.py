"""dr: dense retrieval at scale -- train, encode and search bi-encoders from one CPU to many GPUs."""

__version__ = "0.1.0"
