"""Per-backend XLA compiler options for sdjax's programs (passed per program, never through XLA_FLAGS, so
a user's other JAX programs are untouched).

XLA:CPU (jaxlib 0.10) hands dots, convolutions and also reductions and elementwise fusions to YNNPACK by
default. For SD's UNet the reductions (GroupNorm statistics, softmax sums) run faster in XLA's own
emitters, and the convolutions in XLA's own (Eigen) kernels, so YNNPACK gets the dots only: measured
faster on XLA:CPU at the same output to 1e-6 (the step times: README.md, "Benchmark against PyTorch").
"""

from __future__ import annotations

import jax

_OPTIONS = {
    "cpu": {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    },
}


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """The options for `backend` (default: JAX's default backend), or None when there are none."""
    options = _OPTIONS.get(backend or jax.default_backend())
    return dict(options) if options else None


def jit(fun, **kwargs):
    """`jax.jit(fun, **kwargs)` with `compiler_options()` for the default backend (call it after JAX's
    backends may be initialised, e.g. inside a function, not at import)."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
