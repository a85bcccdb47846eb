"""The speed work on encrypted inference (issue 15): the dealer's ChaCha20 generator, comparisons on
fewer bits, the Chebyshev tanh and the compiler's max-pool/activation rewrite — each against a
plaintext oracle, and the security properties they must keep."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from dpfunc.keys import Key
from dpfunc.mpc.prg import Keystream

seeds = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------- dealer's generator
@given(seeds)
@settings(max_examples=10)
def test_keystream_is_a_function_of_the_key(seed):
    a, b = Keystream(Key(seed)), Keystream(Key(seed))
    assert torch.equal(a.ring((5, 3)), b.ring((5, 3)))
    assert torch.equal(a.words((7,), torch.int16), b.words((7,), torch.int16))
    other = Keystream(Key(seed).fold_in(1)).ring((5, 3))
    assert not torch.equal(Keystream(Key(seed)).ring((5, 3)), other)


def test_keystream_bytes_and_bits_are_uniform():
    raw = Keystream(Key(3)).ring((1 << 16,)).view(torch.uint8)  # 512 KiB
    counts = torch.bincount(raw.long(), minlength=256).numpy()
    assert chisquare(counts).pvalue > 1e-4
    top = (Keystream(Key(4)).ring((20000,)) < 0).double().mean()  # the sign bit is a uniform bit
    assert abs(float(top) - 0.5) < 0.02
    bits = Keystream(Key(5)).bits((20000,))
    assert set(bits.unique().tolist()) == {0, 1} and abs(float(bits.double().mean()) - 0.5) < 0.02


def test_keystream_fill_spans_blocks_and_rejects_bad_outputs():
    from dpfunc.mpc import prg

    n = prg._BLOCK // 8 * 3 + 5  # three full blocks and a tail
    whole = Keystream(Key(6)).ring((n,))
    ks = Keystream(Key(6))
    parts = torch.cat([ks.ring((prg._BLOCK // 8,)) for _ in range(3)] + [ks.ring((5,))])
    assert torch.equal(whole, parts)  # one stream, however it is cut
    with pytest.raises(ValueError, match="contiguous"):
        ks.fill_(torch.zeros(4, 4, dtype=torch.int64).t())
    with pytest.raises(TypeError, match="Key"):
        Keystream(3)
