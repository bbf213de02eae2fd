"""Argument checks shared by the kernels: they run at trace time on static shapes and option names."""
from __future__ import annotations

from collections.abc import Collection, Sequence

import jax.numpy as jnp


def check_option(name: str, value, allowed: Collection) -> None:
    """Raises ValueError naming `name`, the bad value and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {sorted(allowed)}")


def check_same_shape(**arrays) -> None:
    """Raises ValueError listing every shape when the given arrays do not all share one shape."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shapes must match: {listed}")


def check_rank(name: str, array, rank: int, layout: str) -> None:
    """Raises ValueError when `array` does not have `rank` dimensions; `layout` reads like `[B, T, V]`."""
    if jnp.ndim(array) != rank:
        raise ValueError(f"{name} must be {layout} ({rank} dims), got shape {tuple(jnp.shape(array))}")


def check_positive(name: str, value) -> None:
    """Raises ValueError for a Python number <= 0 (traced values cannot be checked and pass through)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def normalize_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Returns sorted, non-negative, unique axes; raises ValueError for an axis out of range or repeated."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not axes:
        raise ValueError("axis must name at least one axis")
    out = []
    for a in axes:
        if not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"axis {a!r} is out of range for an array of {ndim} dims")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return tuple(sorted(out))
