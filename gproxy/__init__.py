"""gproxy: a Gearman protocol proxy that lets workers mark failures retryable."""

__version__ = "0.2.0"
