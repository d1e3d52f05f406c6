"""sct_jax: synthetic CT from MR in JAX/Flax."""

__version__ = "0.1.0"
