"""Accelerator targets for compiling without the accelerator: TPU generations' published figures, a
topology's abstract chips (libtpu's compiler runs on this host), and what a compiled program costs there.

Used by the deviceless reports of `python -m sdjax.bench --target` and `python -m train.bench --target`.
A program's time is the TPU cost model's estimate where it gives one (`cost_model_seconds`: none around
loops), but never less than the roofline of the program's own counts, max(FLOPs / peak, bytes accessed /
bandwidth). Pallas kernels enter both with their declared costs (the flash kernel: the reference's FLOPs,
its operands' bytes once).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published per-chip figures (specifications, not measurements)."""

    bf16_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    hbm_bytes: int
    accelerator_type: str  # TPU_ACCELERATOR_TYPE of a 4-chip host, for libtpu's host discovery


CHIPS = {
    "v4": Chip(275e12, 1228e9, 32 * 2**30, "v4-8"),
    "v5e": Chip(197e12, 819e9, 16 * 2**30, "v5litepod-4"),
    "v5p": Chip(459e12, 2765e9, 95 * 2**30, "v5p-8"),
    "v6e": Chip(918e12, 1640e9, 32 * 2**30, "v6e-4"),
}


# Names the platforms whose kernels programs are traced with (`sdjax.nn.kernels.by_platform`), comma-separated,
# e.g. "cpu"; unset or empty: every platform's, so that a program can be lowered for any.
KERNEL_PLATFORMS_ENV = "SDJAX_KERNEL_PLATFORMS"


def kernel_platforms() -> tuple[str, ...] | None:
    """The platforms named in $SDJAX_KERNEL_PLATFORMS, None (every platform) when it is unset or empty."""
    named = tuple(p.strip() for p in os.environ.get(KERNEL_PLATFORMS_ENV, "").split(",") if p.strip())
    return named or None


def parse_target(target: str) -> tuple[str, str]:
    """ "tpu:v5e:2x2" -> ("v5e", "v5e:2x2"); a one-line ValueError for anything else."""
    parts = target.split(":")
    if len(parts) != 3 or parts[0] != "tpu" or parts[1] not in CHIPS:
        raise ValueError(
            f"--target must be tpu:GENERATION:TOPOLOGY with a generation of {sorted(CHIPS)}, e.g. tpu:v5e:2x2"
        )
    return parts[1], f"{parts[1]}:{parts[2]}"


def topology_devices(generation: str, topology: str) -> list:
    """The abstract TPU devices of a topology (libtpu's compiler; no TPU needed). Refused in one line when
    $SDJAX_KERNEL_PLATFORMS leaves the TPU's kernels out of the programs (`kernels.by_platform`)."""
    named = kernel_platforms()
    if named is not None and "tpu" not in named:
        raise RuntimeError(
            f"cannot compile for {topology}: {KERNEL_PLATFORMS_ENV}={','.join(named)} leaves the TPU's kernels "
            f"out; unset it or add tpu"
        )
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", CHIPS[generation].accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several compiling processes, no chip to share
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as err:  # libtpu missing, or an unknown topology: one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RuntimeError(
            f"cannot compile for {topology}: {first} (install libtpu: pip install -e '.[tpu-aot]')"
        ) from None


def on_device(device, tree):
    """ShapeDtypeStructs of `tree` (arrays or shapes), replicated on one device."""
    sharding = NamedSharding(Mesh(np.array([device]), ("data",)), PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def cost_model_seconds(optimal_seconds: float, hlo_text: str) -> float:
    """The TPU cost model's time for a compiled program, -1 where it has none.

    libtpu prices every instruction it cannot estimate at -1 s and sums. In sdjax's and diffusers-Flax's
    UNets and VAEs the only such instructions are `ConcatBitcast` custom calls (a concatenation done as a
    bitcast: no data moves), so the program's estimate is `optimal_seconds` plus their number; checked on
    ResNet blocks with 0, 1 and 2 of them. Programs with loops (a body is priced once, not per trip) or where
    the sum stays negative get -1."""
    if re.search(r"\bwhile\(", hlo_text):  # a loop's body is priced once, not per trip
        return -1.0
    if optimal_seconds >= 0:
        return optimal_seconds
    corrected = optimal_seconds + len(re.findall(r'custom_call_target="ConcatBitcast"', hlo_text))
    return corrected if corrected >= 0 else -1.0


def analyse(lowered, chip: Chip) -> dict:
    """Compile a lowered program; its compile time, counts, per-chip memory and time (see module doc)."""
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    memory = compiled.memory_analysis()
    flops, moved = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    roofline = max(flops / chip.bf16_flops, moved / chip.hbm_bytes_per_s)
    estimate = cost_model_seconds(float(cost.get("optimal_seconds", -1.0)), compiled.as_text())
    out = {
        "compile_s": compile_s,
        "flops": flops,
        "bytes_accessed": moved,
        "optimal_seconds": estimate,
        "roofline_s": roofline,
        # the roofline is a lower bound: an estimate below it (the cost model around loops) is not believed
        "time_s": max(estimate, roofline),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
    }
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out
