"""avt_jax: audio-video Transformer (AVT) in JAX/Flax."""
