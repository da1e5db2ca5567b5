"""Argument checks shared by the transformations and the estimators: Python numbers are validated at
construction (arrays and tracers, e.g. hyperparameters under `optax.inject_hyperparams`, are not), and
the extra-args contract of the callables a user hands over (`hessian_fn`, `logits_fn`, `loss_fn`)."""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable


def check_number(where: str, name: str, value: Any, ok: Callable[[float], bool], want: str) -> None:
    """ValueError naming `where`'s argument `name` when `value` is a Python (or NumPy) number failing `ok`.

    Arrays and tracers are not checked: under `optax.inject_hyperparams` the hyperparameters are arrays,
    and a traced value cannot be compared in Python.
    """
    if isinstance(value, numbers.Real) and not ok(value):
        raise ValueError(f"{where}: {name}={value!r}; {want}")


def check_interval(where: str, value: Any) -> None:
    """update_interval (k) is an integer >= 1 when it is a Python number."""
    if isinstance(value, numbers.Real) and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                            or value < 1):
        raise ValueError(f"{where}: update_interval={value!r}; use an integer k >= 1 (the estimator runs on "
                         "calls k, 2k, ...)")


def check_callable(where: str, name: str, value: Any, optional: bool = False) -> None:
    if not (callable(value) or (optional and value is None)):
        allowed = "a callable or None" if optional else "a callable"
        raise TypeError(f"{where}: {name} must be {allowed}, got {type(value).__name__}")


def keyword_picker(fn: Callable[..., Any], what: str, positional: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The keyword arguments `fn` is called with, out of a call's extra arguments: decided once, here.

    `fn` takes `positional` leading positional arguments (params; params and key), then keywords. The
    returned `pick(extra_args)` keeps exactly the keywords `fn`'s signature names (all of them when it
    takes `**kwargs`), so that arguments meant for other members of an `optax.chain` are ignored, as optax
    requires. A named parameter that the call did not supply is a TypeError naming it and listing what was
    supplied, even when it has a default: a `loss_mask=` given for a `mask` parameter must not leave the
    mask at its default and count the padding. Keywords bound by `functools.partial` are the partial's.
    A callable without an inspectable signature receives every extra argument.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return dict
    bound = set(fn.keywords) if isinstance(fn, functools.partial) else set()
    parameters = list(signature.parameters.values())
    slots = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(slots) < positional and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
        raise TypeError(f"{what} must take {positional} positional argument(s) first; its signature is {signature}")
    leading = slots[:positional]
    named, takes_all = [], False
    for p in parameters:
        if p.kind is p.VAR_KEYWORD:
            takes_all = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p not in leading and p.name not in bound:
            named.append(p.name)
        elif p.kind is p.POSITIONAL_ONLY and p not in leading:
            raise TypeError(f"{what}'s parameter {p.name!r} is positional-only; extra arguments arrive by keyword")

    def pick(extra_args: dict[str, Any]) -> dict[str, Any]:
        missing = [name for name in named if name not in extra_args]
        if missing:
            supplied = ", ".join(sorted(extra_args)) or "none"
            raise TypeError(f"{what} names {', '.join(repr(m) for m in missing)}, which the call did not supply "
                            f"(extra arguments supplied: {supplied}). Pass it to update() by that name (a parameter "
                            "with a default too, so that an argument under another name is never left unused), "
                            "or bind it in a closure.")
        return dict(extra_args) if takes_all else {name: extra_args[name] for name in named}

    return pick
