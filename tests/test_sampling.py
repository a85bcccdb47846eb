"""Poisson sampling and fixed-shape padding.

Statistical checks are binomial tests at an overall false-alarm rate ALPHA = 1e-6 (Bonferroni over
indices where several are tested at once). Seeds are drawn by hypothesis, which is derandomized under
the ``ci`` profile, so these tests are deterministic there; under ``dev`` a correct implementation
fails each example with probability ≤ 1e-6.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from dpfunc import Key, pad_batch, padded_batch_size, poisson_batches, poisson_sample

ALPHA = 1e-6
seeds = st.integers(0, 2**32 - 1)


def _binom_interval(trials: int, p: float, alpha: float) -> tuple[float, float]:
    return stats.binom.ppf(alpha / 2, trials, p), stats.binom.isf(alpha / 2, trials, p)


@given(seed=seeds, q=st.floats(0.02, 0.98))
def test_each_index_included_with_frequency_q(seed, q):
    n, trials = 40, 800
    key = Key(seed)
    counts = torch.zeros(n, dtype=torch.int64)
    for t in range(trials):
        counts[poisson_sample(key.fold_in(t), n, q)] += 1
    lo, hi = _binom_interval(trials, q, ALPHA / n)  # Bonferroni over the n indices
    assert int(counts.min()) >= lo and int(counts.max()) <= hi, (counts, lo, hi)
    lo_all, hi_all = _binom_interval(trials * n, q, ALPHA)
    assert lo_all <= int(counts.sum()) <= hi_all


@given(seed=seeds, n=st.integers(1, 300), q=st.floats(0.001, 1.0), t1=st.integers(0, 1000))
def test_batches_are_sorted_reproducible(seed, n, q, t1):
    key = Key(seed)
    idx = poisson_sample(key.fold_in(t1), n, q)
    assert idx.dtype == torch.int64 and idx.dim() == 1
    assert torch.equal(idx, torch.unique(idx))  # sorted, no duplicates
    assert idx.numel() == 0 or (0 <= int(idx.min()) and int(idx.max()) < n)
    assert torch.equal(idx, poisson_sample(Key(seed).fold_in(t1), n, q))


@given(seed=seeds, t1=st.integers(0, 1000), t2=st.integers(0, 1000))
def test_batches_differ_across_fold_in(seed, t1, t2):
    # n = 200, q = 0.5: two independent batches coincide with probability 2^-200.
    key = Key(seed)
    a, b = poisson_sample(key.fold_in(t1), 200, 0.5), poisson_sample(key.fold_in(t2), 200, 0.5)
    assert torch.equal(a, b) == (t1 == t2)


def test_seed_zero_and_rate_one():
    a, b = poisson_sample(Key(0), 200, 0.5), poisson_sample(Key(1), 200, 0.5)
    assert not torch.equal(a, b)
    assert torch.equal(poisson_sample(Key(0), 17, 1.0), torch.arange(17))


def test_poisson_batches_uses_fold_in_of_the_step():
    key = Key(9)
    batches = list(poisson_batches(key, 100, 0.1, 4))
    assert len(batches) == 4
    for t, b in enumerate(batches):
        assert torch.equal(b, poisson_sample(key.fold_in(t), 100, 0.1))
    assert list(poisson_batches(key, 100, 0.1, 0)) == []
    with pytest.raises(ValueError, match="poisson_batches: num_steps"):
        list(poisson_batches(key, 100, 0.1, -1))


def test_empty_batches_happen():
    sizes = [poisson_sample(Key(3).fold_in(t), 5, 0.05).numel() for t in range(200)]
    assert 0 in sizes  # P[no empty batch in 200] = (1 - 0.95^5)^200 ≈ 1e-20


@given(n=st.integers(1, 100_000), q=st.floats(1e-4, 1.0), p=st.sampled_from([1e-3, 1e-6, 1e-9]), multiple=st.sampled_from([1, 8, 32]))
def test_padded_batch_size_shape(n, q, p, multiple):
    size = padded_batch_size(n, q, overflow_probability=p, multiple=multiple)
    assert size % multiple == 0 and size >= multiple
    assert size >= math.ceil(n * q) or size >= n
    # the Chernoff/Bernstein size is at least the exact binomial (1 - p) quantile
    assert size >= min(n, stats.binom.isf(p, n, q))


@given(seed=seeds)
def test_padded_batch_size_bound_holds_empirically(seed):
    n, q, p, trials = 2000, 0.02, 1e-2, 400
    size = padded_batch_size(n, q, overflow_probability=p, multiple=1)
    key = Key(seed)
    overflows = sum(poisson_sample(key.fold_in(t), n, q).numel() > size for t in range(trials))
    # if P[overflow] ≤ p, the count is stochastically ≤ Binomial(trials, p)
    assert overflows <= stats.binom.isf(ALPHA, trials, p)


@given(seed=seeds, b=st.integers(0, 10), extra=st.integers(0, 5))
def test_pad_batch(seed, b, extra):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, 3, 2, generator=gen), torch.randint(0, 5, (b,), generator=gen)
    (px, py), mask = pad_batch((x, y), b + extra)
    assert px.shape == (b + extra, 3, 2) and py.shape == (b + extra,)
    assert px.dtype == x.dtype and py.dtype == y.dtype
    assert mask.dtype == torch.bool and mask.shape == (b + extra,)
    assert int(mask.sum()) == b and bool(mask[:b].all())
    assert torch.equal(px[:b], x) and torch.equal(py[:b], y)
    assert torch.equal(px[b:], torch.zeros(extra, 3, 2)) and torch.equal(py[b:], torch.zeros(extra, dtype=y.dtype))


def test_pad_batch_refuses_overflow_and_bad_input():
    with pytest.raises(ValueError, match="pad_batch: size"):
        pad_batch((torch.ones(5, 2),), 4)
    with pytest.raises(ValueError, match="pad_batch: size"):
        pad_batch((torch.ones(5, 2),), 6.0)
    with pytest.raises(ValueError, match="pad_batch: tensors disagree"):
        pad_batch((torch.ones(5, 2), torch.ones(4)), 8)
    with pytest.raises(ValueError, match="pad_batch: tensors is empty"):
        pad_batch((), 8)


@pytest.mark.parametrize("q", [0, 0.0, -0.1, 1.0001, 2, math.nan, math.inf, True])
@pytest.mark.parametrize("fn", [lambda q: poisson_sample(Key(0), 10, q), lambda q: padded_batch_size(10, q)], ids=["poisson_sample", "padded_batch_size"])
def test_bad_sampling_rate(fn, q):
    with pytest.raises(ValueError, match=r"(poisson_sample|padded_batch_size): sampling_rate"):
        fn(q)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_num_examples(n):
    with pytest.raises(ValueError, match="poisson_sample: num_examples"):
        poisson_sample(Key(0), n, 0.1)
    with pytest.raises(ValueError, match="padded_batch_size: num_examples"):
        padded_batch_size(n, 0.1)


@pytest.mark.parametrize("p", [0, 1, -0.5, 2])
def test_bad_overflow_probability(p):
    with pytest.raises(ValueError, match="padded_batch_size: overflow_probability"):
        padded_batch_size(100, 0.1, overflow_probability=p)


def test_poisson_sample_needs_a_key():
    with pytest.raises(TypeError, match="poisson_sample: key"):
        poisson_sample(0, 10, 0.5)


@pytest.mark.parametrize("multiple", [0, -8, 2.5, True])
def test_padded_batch_size_rejects_bad_multiple(multiple):
    with pytest.raises(ValueError, match="padded_batch_size: multiple"):
        padded_batch_size(100, 0.1, multiple=multiple)
