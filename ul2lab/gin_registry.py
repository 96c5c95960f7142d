"""The one place that makes core objects gin-configurable (the core itself never imports gin).

Each configurable is registered under its defining module, so gin files may use the full name
(`ul2lab.schedules.infinite_schedule.peak_value`) or the short one (`infinite_schedule.peak_value`).
"""
import inspect
from typing import Callable, Dict

import gin

_REGISTERED: Dict[str, Callable] = {}
_ORIGINALS: Dict[str, Callable] = {}


def register() -> Dict[str, Callable]:
    """Register everything (idempotent); returns {name: gin-wrapped callable}."""
    if _REGISTERED:
        return _REGISTERED
    from ul2lab import infer_cli, optimizers, schedules, trainer
    from ul2lab.models import config

    for fn in (config.T5Config, config.preset,
               trainer.TrainConfig, infer_cli.EvalConfig, infer_cli.InferConfig,
               schedules.constant_schedule, schedules.rsqrt_schedule, schedules.cosine_schedule,
               schedules.wsd_schedule, schedules.infinite_schedule,
               optimizers.make_optimizer):
        _ORIGINALS[fn.__name__] = fn
        _REGISTERED[fn.__name__] = gin.external_configurable(fn, fn.__name__, module=fn.__module__)
    return _REGISTERED


def configurable_names() -> list:
    return sorted(register())


def parameter_names(name: str) -> list:
    """The parameters a registered configurable accepts (for close-match suggestions)."""
    register()
    name = name.split(".")[-1]
    fn = _ORIGINALS.get(name)
    if fn is None:
        return []
    names = [p for p in inspect.signature(fn).parameters if p not in ("self", "args", "kwargs", "overrides")]
    if name == "preset":  # preset(name, **overrides): any T5Config field may be overridden
        names += [p for p in parameter_names("T5Config") if p != "name"]
    return names
