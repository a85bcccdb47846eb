"""Aggregators by name, so the CLI and the Flower ServerApp can use one that another module registers."""

from __future__ import annotations

from collections.abc import Callable

from dpfunc.federated.aggregate import Aggregator, WeightedFedAvg

__all__ = ["AGGREGATORS", "register_aggregator", "make_aggregator"]


def _secure_aggregator(**options) -> Aggregator:
    """Secure aggregation (issue 14), imported on first use: ``dpfunc.secagg.federated.SecureAggregator``."""
    from dpfunc.secagg.federated import SecureAggregator

    return SecureAggregator(**options)


AGGREGATORS: dict[str, Callable[..., Aggregator]] = {"fedavg": WeightedFedAvg, "secagg": _secure_aggregator}


def register_aggregator(name: str, factory: Callable[..., Aggregator]) -> None:
    """Make ``factory(**options)`` available as ``--aggregator NAME``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_aggregator: name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_aggregator: factory must be callable, got {factory!r}")
    AGGREGATORS[name] = factory


def make_aggregator(name: str, **options) -> Aggregator:
    """The aggregator registered as ``name``, built with ``options``."""
    if name not in AGGREGATORS:
        raise ValueError(f"make_aggregator: aggregator must be one of {sorted(AGGREGATORS)}, got {name!r}")
    agg = AGGREGATORS[name](**options)
    if not isinstance(agg, Aggregator):
        raise TypeError(f"make_aggregator: {name!r} built {agg!r}, which has no aggregate(updates, reference) method")
    return agg
