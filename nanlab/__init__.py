"""nanlab: reproduce, localize and fix non-finite values in JAX training."""

__version__ = "0.1.0"
