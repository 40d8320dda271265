"""gproxy: a Gearman protocol proxy that lets workers mark failures retryable."""

__version__ = "0.3.0.dev0"
