"""The persistent XLA compilation cache: compiled programs reused across processes.

On by default in `~/.cache/sdjax/xla` (or `$XDG_CACHE_HOME/sdjax/xla`), a directory only the user can read
or write (compiled programs are executable code). `SDJAX_CACHE_DIR=/some/dir` moves it;
`SDJAX_CACHE_DIR=off` (or `0`, `none`, empty) disables it. The CLI's `--cache-dir` does the same.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import jax

ENV_VAR = "SDJAX_CACHE_DIR"
_OFF = {"", "0", "off", "none", "false", "no"}


def default_cache_dir() -> Path | None:
    """The directory from $SDJAX_CACHE_DIR, else the per-user default; None when disabled."""
    value = os.environ.get(ENV_VAR)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sdjax" / "xla"


def enable_compilation_cache(directory: str | os.PathLike | None = "default") -> Path | None:
    """Points JAX's persistent compilation cache at `directory` ("default": `default_cache_dir()`;
    None or "off": disabled). Creates it with mode 0700 and refuses one that others can write to."""
    if directory == "default":
        path = default_cache_dir()
    elif directory is None or str(directory).strip().lower() in _OFF:
        path = None
    else:
        path = Path(directory).expanduser()
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"compilation cache {path} is a file: pass a folder, or 'off' (--cache-dir off)")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"compilation cache {path} is writable by other users; use a private directory "
            f"(chmod 700 {path}) or set {ENV_VAR}=off"
        )
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def enable_default_cache() -> Path | None:
    """The library's default: `enable_compilation_cache("default")` unless JAX's cache directory has been
    configured already (by the user, or by an earlier call); returns the directory in use."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured) if jax.config.jax_enable_compilation_cache else None
    return enable_compilation_cache("default")
