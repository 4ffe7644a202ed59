"""Strict numerics for every test: x64 on (float32 cases use explicit float32 arrays),
rank promotion and implicit dtype promotion raise instead of silently broadcasting."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
