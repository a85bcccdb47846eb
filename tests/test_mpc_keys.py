"""Each party's 256-bit key (issue 15): drawn from OS entropy in its own process, keying its AES-256-CTR
generator directly; a seed only reproduces a run; the key never appears in the command line or in any
message a party sends."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from dpfunc.mpc import StreamKey, decode, encode, mul, reveal_to, run_dealer, share_from, simulate, tanh
from dpfunc.mpc.context import party_stream_key
from dpfunc.mpc.parties import party_argv, party_key
from dpfunc.mpc.prg import Keystream

seeds = st.integers(0, 2**32 - 1)


def test_default_party_keys_are_256_bits_and_fresh():
    keys = [party_key() for _ in range(16)]
    assert all(isinstance(k, StreamKey) and len(k.raw) == 32 for k in keys)
    assert len({k.raw for k in keys}) == 16  # differ between calls, hence between parties
    raw = b"".join(k.raw for k in keys)
    assert len(set(raw)) > 100  # 512 bytes of OS entropy take ≈ 221 of the 256 byte values (a short key would not)


@given(seeds)
@settings(max_examples=10)
def test_a_seed_reproduces_a_key_and_its_stream(seed):
    assert party_key(seed) == party_key(seed) and party_key(seed) != party_key(seed + 1)
    a, b = Keystream(party_key(seed).fold_in(4)), Keystream(party_key(seed).fold_in(4))
    assert torch.equal(a.ring((6, 5)), b.ring((6, 5)))
    assert not torch.equal(Keystream(party_key(seed).fold_in(5)).ring((6, 5)), Keystream(party_key(seed).fold_in(4)).ring((6, 5)))


def test_stream_key_is_validated_hidden_and_not_pickled():
    k = StreamKey.generate()
    assert k.raw.hex() not in repr(k)
    with pytest.raises(ValueError, match="StreamKey: raw must be exactly 32 bytes"):
        StreamKey(b"\0" * 8)
    with pytest.raises(TypeError, match="StreamKey.fold_in: data must be an int"):
        k.fold_in("1")
    with pytest.raises(TypeError, match="party_key: seed must be an int or None"):
        party_key("7")
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(k)
    with pytest.raises(AttributeError):
        k.raw = b"\0" * 32


def test_stream_key_keystream_is_uniform_and_keyed_by_the_raw_bytes():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    k = StreamKey.from_seed(3)
    words = Keystream(k).ring((1 << 15,))
    # the stream is AES-256 in counter mode (initial counter block 0) with the key's 32 bytes as its key,
    # nothing in between
    enc = Cipher(algorithms.AES(k.raw), modes.CTR(bytes(16))).encryptor()
    assert words.numpy().tobytes() == enc.update(bytes(8 << 15))
    counts = torch.bincount(words.view(torch.uint8).long(), minlength=256).numpy()
    assert chisquare(counts).pvalue > 1e-4


def test_keys_are_not_in_the_command_line():
    kw = dict(addr="127.0.0.1", port=1, spec_path="s.json", timeout=9.0, weights_path="w", images_path="x", out_path="o")
    argv = party_argv(**kw)
    assert not any(a in ("--seed", "--key") for args in argv.values() for a in args)
    given_ = party_argv(**kw, seeds=(1, 2, 3))
    assert [given_[r][given_[r].index("--seed") + 1] for r in ("model-owner", "data-owner", "dealer")] == ["1", "2", "3"]


def _message_bytes(tensors) -> bytes:
    return b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors)


def test_no_key_appears_in_any_message_a_party_sends():
    """Every byte a party sends — party to party (the other's transcript) and dealer to party (its
    material stream) — searched for every key in play: the three parties' keys and each child key
    they derive (per batch, per request); the seed the dealer shares with a party appears only at the
    start of that party's stream."""
    dealer, owner0, owner1 = StreamKey.generate(), StreamKey.generate(), StreamKey.generate()
    x = encode(torch.linspace(-3, 3, 24, dtype=torch.float64).view(2, 12))
    w = encode(torch.linspace(-1, 1, 24, dtype=torch.float64).view(2, 12))

    def program(ctx):
        xs = share_from(ctx, 1, x if ctx.rank == 1 else None, (2, 12), owner1.fold_in(0))
        ws = share_from(ctx, 0, w if ctx.rank == 0 else None, (2, 12), owner0.fold_in(0))
        return reveal_to(ctx, 1, tanh(ctx, mul(ctx, xs, ws), bits=32))

    res = simulate(program, dealer_key=dealer, record=True)
    exact = torch.tanh(torch.linspace(-3, 3, 24, dtype=torch.float64) * torch.linspace(-1, 1, 24, dtype=torch.float64))
    assert (decode(res.outputs[1]).view(-1) - exact).abs().max() < 1e-3  # it ran
    source = run_dealer(program, dealer)
    sent = [_message_bytes(res.transcripts[0]), _message_bytes(res.transcripts[1]),
            source.flat(0).numpy().tobytes(), source.flat(1).numpy().tobytes()]
    assert all(len(s) > 0 for s in sent)
    seed0, seed1 = party_stream_key(dealer, 0), party_stream_key(dealer, 1)
    keys = [dealer, owner0, owner1, owner0.fold_in(0), owner1.fold_in(0)]
    keys += [seed.fold_in(i) for seed in (seed0, seed1) for i in range(source.requests)]
    for k in keys:
        for s in sent:
            assert s.find(k.raw) < 0 and s.find(k.raw[:16]) < 0
    # the seed the dealer shares with a party: in the header of that party's stream, nowhere else
    assert sent[2].find(seed0.raw) == 0 and sent[3].find(seed1.raw) == 0
    for s in (sent[0], sent[1], sent[3]):
        assert s.find(seed0.raw[:16]) < 0
    for s in (sent[0], sent[1], sent[2]):
        assert s.find(seed1.raw[:16]) < 0
    # the search finds a key that is there (the check can fail)
    assert (sent[0][:40] + dealer.raw + sent[0][40:]).find(dealer.raw) == 40


# --------------------------------------------------------------------- seeded shares (the dealer)
def test_seeded_material_is_correct_uniform_and_sent_only_as_corrections():
    """Each party expands its shares from its seed; the dealer sends party 1 only the corrections.
    The shares add up (triples, AND triples, bits, fixed triples), party 0 receives nothing but its
    header, and the correction bytes are uniform (chi-square, α = 1e-4, keyed so every run decides
    the same) and the same for any input (the dealer sees none)."""
    from dpfunc.mpc import Bilinear, DealerSource, Kind, MaterialStream, Request
    from dpfunc.mpc.context import HEADER_BYTES

    reqs = [Request(Kind.TRIPLE, (3, 4), (4, 5), Bilinear.MATMUL), Request(Kind.SQUARE, (2000,)),
            Request(Kind.AND, (1000,), params=(16,)), Request(Kind.AND2, (1000,), params=(8,)),
            Request(Kind.CROSS_AND, (1000,), params=(32,)),
            Request(Kind.BIT, (500,)), Request(Kind.MASK, (), (4, 5), mask_id=1),
            Request(Kind.FIXED_TRIPLE, (3, 4), (4, 5), Bilinear.MATMUL, mask_id=1)]
    dealer = DealerSource(StreamKey.from_seed(11))
    for r in reqs:
        dealer.draw(r)
    flat0, flat1 = dealer.flat(0), dealer.flat(1)
    assert flat0.numel() == HEADER_BYTES  # the model owner gets its seed only
    p0, p1 = MaterialStream(flat0), MaterialStream(flat1)
    for r in reqs:
        s0, s1 = p0.draw(r), p1.draw(r)
        if r.kind is Kind.TRIPLE:
            a, b, c = (u + v for u, v in zip(s0, s1))
            assert torch.equal(c, a @ b)
        elif r.kind is Kind.SQUARE:
            a, c = (u + v for u, v in zip(s0, s1))
            assert torch.equal(c, a * a)
        elif r.kind is Kind.AND:
            a, b, c = (u ^ v for u, v in zip(s0, s1))
            assert torch.equal(c, a & b)
        elif r.kind is Kind.AND2:
            a, b1, b2, c1, c2 = (u ^ v for u, v in zip(s0, s1))
            assert torch.equal(c1, a & b1) and torch.equal(c2, a & b2)
        elif r.kind is Kind.CROSS_AND:
            assert torch.equal(s0[1] ^ s1[1], s0[0] & s1[0])
        elif r.kind is Kind.BIT:
            bit = (s0[0] ^ s1[0]).long()
            assert set(bit.unique().tolist()) <= {0, 1} and torch.equal(s0[1] + s1[1], bit)
        elif r.kind is Kind.MASK:
            mask = s0[0] + s1[0]
        else:
            a, c = (u + v for u, v in zip(s0, s1))
            assert torch.equal(c, a @ mask)
    assert p0.exhausted and p1.exhausted
    counts = torch.bincount(flat1[HEADER_BYTES:].long(), minlength=256).numpy()
    assert chisquare(counts).pvalue > 1e-4
    # a correction depends on the dealer's key only, and differs between keys
    other = DealerSource(StreamKey.from_seed(12))
    for r in reqs:
        other.draw(r)
    assert not torch.equal(other.flat(1)[HEADER_BYTES:], flat1[HEADER_BYTES:])
