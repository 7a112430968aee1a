"""Sentence-embedding dual encoders trained with contrastive learning in JAX/Flax."""
