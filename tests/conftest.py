"""Strict numerics for every test: x64 on (float32 cases use explicit float32 arrays),
rank promotion and implicit dtype promotion raise instead of silently broadcasting."""

import os

# Tests compile hundreds of small programs: skip XLA's slow backend optimizations (numerics are
# still IEEE; every comparison is against an independent reference computed the same way).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
)

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
