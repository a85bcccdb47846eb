"""dpfunc.Key: explicit, immutable random keys (invariant 4: every seed, 0 included, is valid)."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpfunc import Key

any_int = st.integers(-(2**200), 2**200)
seeds = st.integers(0, 2**32 - 1)


def _draw(key: Key, n: int = 8) -> torch.Tensor:
    return torch.randn(n, generator=key.generator(), dtype=torch.float64)


@given(seed=any_int)
def test_any_int_is_a_valid_seed_and_reproduces(seed):
    key = Key(seed)
    assert 0 <= key.seed < 2**64
    assert 0 <= key.state < 2**64
    assert torch.equal(_draw(key), _draw(Key(seed)))


def test_seed_zero_is_valid_and_differs_from_seed_one():
    z0, z1 = _draw(Key(0)), _draw(Key(1))
    assert torch.isfinite(z0).all()
    assert not torch.equal(z0, z1)
    # `if seed:` style bugs would map 0 to some default: make sure 0 is not the same as None/global.
    assert not torch.equal(z0, torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))


def test_negative_and_huge_seeds_reduce_mod_2_64():
    assert Key(-1) == Key(2**64 - 1)
    assert Key(2**64 + 5) == Key(5)
    assert Key(-1) != Key(1)


@given(seed=seeds, a=st.integers(0, 2**40), b=st.integers(0, 2**40))
def test_fold_in_is_deterministic_and_distinct(seed, a, b):
    key = Key(seed)
    assert key.fold_in(a) == Key(seed).fold_in(a)
    assert key.fold_in(a) != key  # derived key is not the parent
    if a != b:
        assert key.fold_in(a) != key.fold_in(b)
        assert not torch.equal(_draw(key.fold_in(a)), _draw(key.fold_in(b)))


@given(seed=seeds, num=st.integers(1, 6))
def test_split_gives_distinct_keys(seed, num):
    keys = Key(seed).split(num)
    assert len(keys) == num
    states = {k.state for k in keys} | {Key(seed).state}
    assert len(states) == num + 1
    assert keys == Key(seed).split(num)


@given(s1=seeds, s2=seeds, d=st.integers(0, 1000))
def test_different_parents_give_different_children(s1, s2, d):
    if s1 != s2:
        assert Key(s1).fold_in(d) != Key(s2).fold_in(d)


def test_key_is_immutable_and_hashable():
    key = Key(3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.seed = 4
    assert key.seed == 3
    assert len({Key(3), Key(3), Key(4)}) == 2


def test_generator_is_fresh_each_call_and_leaves_global_rng_alone():
    key = Key(7)
    before = torch.get_rng_state().clone()
    g1 = key.generator()
    a = torch.rand(4, generator=g1)
    b = torch.rand(4, generator=g1)  # the stream advances within one generator ...
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.rand(4, generator=key.generator()))  # ... but a new one restarts it
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("bad", [1.0, "1", None, True])
def test_bad_seed_types_raise(bad):
    with pytest.raises(TypeError, match="Key"):
        Key(bad)


@pytest.mark.parametrize("bad", [1.5, "x", False])
def test_fold_in_rejects_non_int(bad):
    with pytest.raises(TypeError, match="fold_in"):
        Key(0).fold_in(bad)


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_split_rejects_bad_num(bad):
    with pytest.raises(ValueError, match="split"):
        Key(0).split(bad)
