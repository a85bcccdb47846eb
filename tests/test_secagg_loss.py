"""Secure aggregation carries no training loss unless the run opts in (``report_train_loss``).

The site's raw training loss is outside its (ε, δ). The secure sum had a loss slot that every site filled
(with 0 when it reported none), and the round record a ``mean_loss`` of 0.0 that read like a real loss.
Now, without the opt-in, the masked vector has no loss slot at all: nothing derived from
``SiteUpdate.loss`` is encoded, and ``mean_loss`` is None / absent from the record.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpfunc.federated import SiteUpdate
from dpfunc.secagg.federated import SecureAggregator, _layout, encode_site
from dpfunc.secagg.remote import site_keep_input

LOSSES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(0.0), st.floats(-1e6, 1e6))


def _updates(seed: int, n: int, size: int, losses) -> tuple[dict, list[SiteUpdate]]:
    g = torch.Generator().manual_seed(seed)
    ref = {"w": torch.randn(size, generator=g), "b": torch.randn(2, generator=g)}
    ups = [SiteUpdate(s, 3, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in ref.items()}, float(10 + s), 1,
                      losses[s]) for s in range(n)]
    return ref, ups


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 5), size=st.integers(1, 12), data=st.data())
def test_nothing_derived_from_the_raw_loss_is_encoded_without_the_opt_in(seed, n, size, data):
    """Two sets of raw losses (any floats, NaN included) give byte-identical masked inputs, kept site stores,
    sums and round records; the vector has no loss slot, and mean_loss is None."""
    a = data.draw(st.lists(LOSSES, min_size=n, max_size=n))
    b = data.draw(st.lists(LOSSES, min_size=n, max_size=n))
    ref, ups_a = _updates(seed, n, size, a)
    _, ups_b = _updates(seed, n, size, b)
    agg = SecureAggregator(max_weight=100, seed=bytes(32))
    layout = _layout(ref)
    for ua, ub in zip(ups_a, ups_b):
        va, vb = encode_site(agg, ua, ref, layout), encode_site(agg, ub, ref, layout)
        assert va.size == size + 2 + 2  # P coordinates + weight + clipped flag: no loss slot
        assert np.array_equal(va, vb)
        sa, sb = {}, {}
        site_keep_input(ua, ref, sa, aggregator=agg)
        site_keep_input(ub, ref, sb, aggregator=agg)
        assert sa == sb  # what the site keeps, masks and sends
    agg_b = SecureAggregator(max_weight=100, seed=bytes(32))
    out_a, out_b = agg.aggregate(ups_a, ref), agg_b.aggregate(ups_b, ref)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert agg.last_round.mean_loss is None is agg_b.last_round.mean_loss
    rec = agg.last_round.to_record(range(n))
    assert "mean_loss" not in rec and rec == agg_b.last_round.to_record(range(n))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), reports=st.lists(st.booleans(), min_size=2, max_size=5), data=st.data())
def test_with_the_opt_in_the_mean_loss_covers_the_reporting_sites_only(seed, reports, data):
    """A site that does not report (NaN: e.g. its node config does not consent) adds zeros and no weight to
    the loss slots; mean_loss is the weighted mean of the reporting sites' losses, None if none reported."""
    n = len(reports)
    vals = data.draw(st.lists(st.floats(0.0, 10.0), min_size=n, max_size=n))
    losses = [v if r else math.nan for v, r in zip(vals, reports)]
    ref, ups = _updates(seed, n, 4, losses)
    agg = SecureAggregator(max_weight=100, seed=bytes(32), report_train_loss=True)
    agg.aggregate(ups, ref)
    info = agg.last_round
    assert encode_site(agg, ups[0], ref, _layout(ref)).size == 4 + 2 + 4  # + loss and loss-weight slots
    w = [u.weight for u, r in zip(ups, reports) if r]
    if not w:
        assert info.mean_loss is None and "mean_loss" not in info.to_record(range(n))
    else:
        want = sum(u.weight * u.loss for u, r in zip(ups, reports) if r) / sum(w)
        bound = n * agg.loss_fp.scale / 2 * agg.max_weight / sum(w)
        assert abs(info.mean_loss - want) <= bound + 1e-12
        assert info.to_record(range(n))["mean_loss"] == info.mean_loss


def test_report_train_loss_must_be_a_bool():
    with pytest.raises(TypeError, match="SecureAggregator: report_train_loss must be a bool"):
        SecureAggregator(report_train_loss=1)
