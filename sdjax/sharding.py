"""Device meshes, parameter placement rules and batch placement: one code path from one CPU to a TPU pod.

A mesh always has the two axes ("data", "fsdp"), written as a spec such as "data=8" or "data=2,fsdp=4"
(a missing axis has size 1; one axis may be -1: all remaining devices). The batch is split over both axes
(`BATCH_AXES`); parameters are replicated, or split over "fsdp" by a small regex rule table (`DEFAULT_RULES`)
for models that do not fit one device. Multi-host: `initialize_distributed` starts `jax.distributed`, and
`global_batch` turns each host's local rows into one global array.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # a batch row lives on one device: split over every axis
REPLICATED = "replicated"
FSDP = "fsdp"
# (regex on the "/"-joined parameter path, placement), first match wins. FSDP shards the largest axis that
# the fsdp size divides; arrays under MIN_FSDP_SIZE elements (norms, biases) stay replicated.
DEFAULT_RULES: tuple[tuple[str, str], ...] = ((r".*", FSDP),)
MIN_FSDP_SIZE = 2**14


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """ "data=2,fsdp=4" -> {"data": 2, "fsdp": 4}; None or "" -> every device on "data"; -1 fills up."""
    sizes = {axis: 1 for axis in AXES}
    if not spec:
        sizes["data"] = num_devices
        return sizes
    given = {}
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        if not eq or name not in AXES:
            raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}")
        try:
            given[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh spec {spec!r}: size {value!r} of {name} is not an integer") from None
    fill = [name for name, size in given.items() if size == -1]
    if len(fill) > 1 or any(size < 1 and size != -1 for size in given.values()):
        raise ValueError(f"bad mesh spec {spec!r}: sizes must be >= 1, with at most one -1")
    known = math.prod(size for size in given.values() if size != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices do not split into {known} x N")
        given[fill[0]] = num_devices // known
    sizes.update(given)
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh spec {spec!r} has {math.prod(sizes.values())} devices but there are {num_devices}; "
            f"use sizes whose product is {num_devices} (or -1 for one axis)"
        )
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: every device of every process); use it under
    `jax.set_mesh(mesh)` or pass it on."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[axis] for axis in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_spec(ndim: int) -> PartitionSpec:
    """Leading axis over the batch axes, the rest whole."""
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim))


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    if fsdp == 1 or math.prod(shape) < MIN_FSDP_SIZE:
        return PartitionSpec()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_specs(
    params: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES, replicate: bool = False
) -> Any:
    """A PartitionSpec per parameter leaf (same tree) from the first rule whose regex matches its path."""
    fsdp = mesh.shape["fsdp"]
    compiled = [(re.compile(pattern), placement) for pattern, placement in rules]

    def spec(path, leaf):
        if replicate:
            return PartitionSpec()
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for pattern, placement in compiled:
            if pattern.search(name):
                if placement == REPLICATED:
                    return PartitionSpec()
                if placement == FSDP:
                    return _fsdp_spec(tuple(np.shape(leaf)), fsdp)
                raise ValueError(f"unknown placement {placement!r} in the rule for {pattern.pattern!r}")
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = DEFAULT_RULES, **kwargs) -> Any:
    """Places every parameter by the rules (replicated, or FSDP-split), as global arrays on `mesh`."""
    specs = param_specs(params, mesh, rules, **kwargs)
    return jax.tree.map(lambda p, s: jax.device_put(p, NamedSharding(mesh, s)), params, specs)


def global_batch(local: Mapping[str, np.ndarray] | np.ndarray, mesh: Mesh):
    """This process's rows -> global arrays split over the batch axes (rows of all processes concatenated in
    process order). Every process passes the same number of rows."""

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(one, local)


def local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that live on this process, in global order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicas along other axes hold the same rows
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts `jax.distributed` when asked (all three values), or when JAX detects a cluster (TPU pod,
    Slurm, ...); returns whether this is a multi-process run. Call before anything touches a device."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("multi-host runs need all of --coordinator HOST:PORT, --num-processes and --process-id")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return True
    try:
        jax.distributed.initialize()
    except (ValueError, RuntimeError):  # no cluster environment detected: a single process
        return False
    return jax.process_count() > 1


def host_share(items: Sequence[Any], process_index: int | None = None, process_count: int | None = None) -> list:
    """The items this host owns: every process_count-th one, starting at process_index."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return list(items[index::count])
