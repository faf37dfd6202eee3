"""The built-in offline benchmark (what `dontstop demo` runs): `dontstop grid --config configs/synthetic.py:tiny`."""

from dontstop_jax.phases.synthetic import get_config  # noqa: F401
