"""The dealer's streamed material (bounded memory, bit-identical results) and weight masks reused
across batches (same results as plaintext, fewer bytes, a view independent of the weights)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency
from torch import nn

from dpfunc.bridge.mpc import compile_module, encode_weights, encrypted_inference, share_model
from dpfunc.keys import Key
from dpfunc.models import SmallCNN
from dpfunc.mpc import (
    Bilinear,
    Context,
    DealerSource,
    Kind,
    MaterialQueue,
    MaterialStream,
    Request,
    TanhApprox,
    decode,
    encode,
    share_from,
    simulate,
)
from dpfunc.mpc.context import DEALER, HEADER_BYTES, deal, material_nbytes
from dpfunc.mpc.protocols import beaver_fixed, mask_operands, matmul, reveal_to

seeds = st.integers(0, 2**32 - 1)


def _session(model, xs, *, reuse, seed=0):
    """A program for the whole session: weights shared once, then one batch per tensor in ``xs``."""
    program = compile_module(model)
    weights = encode_weights(model, program)
    images = [encode(x) for x in xs]

    def party(ctx):
        shared = share_model(ctx, program, weights if ctx.rank == 0 else None, key=Key(seed).fold_in(ctx.rank),
                             reuse_masks=reuse)
        outs = []
        for i, img in enumerate(images):
            outs.append(encrypted_inference(ctx, program, tuple(img.shape), key=Key(seed).fold_in(10 + i),
                                            image=img if ctx.rank == 1 else None, model=shared))
        return outs

    return party


def _per_call(model, x, seed=0):
    """The original per-batch program (weights shared with every call, fresh full triples)."""
    program = compile_module(model)
    weights, image = encode_weights(model, program), encode(x)

    def party(ctx):
        return encrypted_inference(ctx, program, tuple(x.shape), key=Key(seed).fold_in(ctx.rank),
                                   image=image if ctx.rank == 1 else None,
                                   weights=weights if ctx.rank == 0 else None)

    return party


def _deep(depth: int, width: int = 4) -> nn.Module:
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 6 * 6, 2)).eval()
    g = Key(depth).generator()  # explicit-key weights (the global RNG is left alone)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ------------------------------------------------------------------------------ bit-identical
@pytest.mark.parametrize("chunk_bytes", [1, 4096, 1 << 20])
def test_streamed_material_gives_bit_identical_results(chunk_bytes):
    """Streaming in chunks (1 byte: one request per chunk) equals the whole-material oracle exactly:
    same ring values of the logits, for the per-call program and for a session with reused masks."""
    model = SmallCNN(key=Key(3), widths=(4, 8), groups=2).eval()
    x = torch.rand(2, 1, 12, 12, generator=Key(4).generator())
    for program in (_per_call(model, x), _session(model, [x, x.flip(0)], reuse=True)):
        whole = simulate(program, dealer_key=Key(7), stream=False)
        streamed = simulate(program, dealer_key=Key(7), stream=True, chunk_bytes=chunk_bytes)
        a, b = whole.outputs[1], streamed.outputs[1]
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(u.logits, v.logits) and torch.equal(u.onehot, v.onehot)
        assert whole.dealer_bytes == streamed.dealer_bytes
        assert whole.stats[1].to_dict() == streamed.stats[1].to_dict()


# --------------------------------------------------------------------------- bounded memory
def test_material_held_is_bounded_independent_of_depth():
    """The dealer's queue holds at most queue_chunks + 2 chunks (one being put, the queued ones, one
    being read) of at most chunk_bytes + one request each, for a 2-layer and a 12-layer network alike, while the total grows with the depth."""
    chunk, queue_chunks = 16 << 10, 1
    x = torch.rand(2, 4, 6, 6, generator=Key(1).generator())
    peaks, totals = {}, {}
    for depth in (2, 12):
        program = _per_call(_deep(depth), x)
        res = simulate(program, dealer_key=Key(2), chunk_bytes=chunk, queue_chunks=queue_chunks)
        probe = DealerSource(Key(2))  # the largest single request of this program (whole oracle)
        program(Context(DEALER, None, probe))
        bound = (queue_chunks + 2) * (chunk + probe.largest_request_bytes)
        assert max(res.peak_material_bytes) <= bound
        assert res.dealer_peak_pending_bytes <= chunk + probe.largest_request_bytes
        peaks[depth], totals[depth] = max(res.peak_material_bytes), res.dealer_bytes[1]
        assert probe.flat(1).numel() == totals[depth]  # the header and party 1's corrections
    assert totals[12] > 4 * totals[2] and totals[12] > 4 * (queue_chunks + 2) * chunk
    assert peaks[12] <= 1.5 * peaks[2]  # the same widths: the same chunks, whatever the depth
    # without streaming the whole material is held (what the streaming removes)
    whole = simulate(_per_call(_deep(12), x), dealer_key=Key(2), stream=False)
    assert max(whole.peak_material_bytes) == totals[12] > 4 * peaks[12]


def test_material_queue_counts_held_bytes():
    q = MaterialQueue(maxsize=2, timeout=5)
    q.put(torch.zeros(10, dtype=torch.uint8))
    q.put(torch.zeros(30, dtype=torch.uint8))
    assert q.held_bytes == 40 and q.peak_held_bytes == 40
    assert q.get().numel() == 10 and q.held_bytes == 40  # the chunk being read is still held
    assert q.get().numel() == 30 and q.held_bytes == 30  # the first one is released
    q.put(None)
    assert q.get() is None and q.held_bytes == 0
    with pytest.raises(TimeoutError, match="MaterialQueue.get: no material from the dealer"):
        MaterialQueue(timeout=0.01).get()
    with pytest.raises(ValueError, match="MaterialQueue: maxsize must be an int >= 1, got 0"):
        MaterialQueue(maxsize=0)


def test_a_program_mismatch_is_caught_in_the_stream():
    dealer = DealerSource(Key(0))
    dealer.draw(Request(Kind.SQUARE, (3,)))
    flat = dealer.flat(1)  # party 1: the 40-byte header, then the square's correction (3 words)
    assert flat.numel() == HEADER_BYTES + 24 and dealer.flat(0).numel() == HEADER_BYTES
    chunks = iter([flat[:HEADER_BYTES], flat[HEADER_BYTES:], None])
    stream = MaterialStream(next_chunk=lambda: next(chunks))
    with pytest.raises(RuntimeError, match="material ran out at triple"):
        stream.draw(Request(Kind.TRIPLE, (4, 4), (4, 4), Bilinear.MATMUL))
    leftover = iter([flat[:HEADER_BYTES], flat[HEADER_BYTES:], torch.zeros(8, dtype=torch.uint8)])
    stream = MaterialStream(next_chunk=lambda: next(leftover))
    stream.draw(Request(Kind.SQUARE, (3,)))
    assert not stream.exhausted  # a further chunk after the program's last request
    with pytest.raises(RuntimeError, match="does not start with a 40-byte header"):
        MaterialStream(torch.zeros(8, dtype=torch.uint8)).draw(Request(Kind.SQUARE, (1,)))
    with pytest.raises(TypeError, match="exactly one of flat and next_chunk"):
        MaterialStream()
    with pytest.raises(ValueError, match="DealerSource: chunk_bytes must be an int >= 1, got 0"):
        DealerSource(Key(0), sink=lambda r, c: None, chunk_bytes=0)


# ------------------------------------------------------------------------ reused weight masks
def test_session_with_reused_masks_matches_plaintext_and_sends_fewer_bytes():
    model = SmallCNN(key=Key(5), widths=(4, 8), groups=2).eval()
    xs = [torch.rand(2, 1, 12, 12, generator=Key(6 + i).generator()) for i in range(3)]
    reused = simulate(_session(model, xs, reuse=True), dealer_key=Key(9))
    fresh = simulate(_session(model, xs, reuse=False), dealer_key=Key(9))
    for res in (reused, fresh):
        for x, out in zip(xs, res.outputs[1]):
            with torch.no_grad():
                ref = model(x).double()
            assert (decode(out.logits) - ref).abs().max() < 2e-3
            assert torch.equal(out.onehot.argmax(-1), ref.argmax(-1))
    # the data owner sends e = x − a only: per batch, 8 bytes less per conv/linear weight entry;
    # the mask openings happen once, in the setup round
    program = compile_module(model)
    masked = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2)
    setup_diff = 8 * masked  # the one-time opening of f = w − b
    diff = fresh.stats[1].bytes_sent - reused.stats[1].bytes_sent
    assert diff == len(xs) * 8 * masked - setup_diff
    assert {op.kind.value for op in program.ops} >= {"conv2d", "linear"}
    # the dealer sends party 1 one output-sized correction per product either way (seeded shares),
    # and nothing for the masks
    assert reused.dealer_bytes == fresh.dealer_bytes


def test_fixed_triples_and_masks_from_the_dealer_are_correct():
    masks: dict = {}
    s0, s1 = deal(Request(Kind.MASK, (), (3, 2), mask_id=4), Key(1), masks)
    assert torch.equal(s0[0] + s1[0], masks[4])
    for seed in range(3):  # fresh a every time, the same b
        t0, t1 = deal(Request(Kind.FIXED_TRIPLE, (5, 3), (3, 2), Bilinear.MATMUL, mask_id=4), Key(10 + seed), masks)
        a, c = (u + v for u, v in zip(t0, t1))
        assert torch.equal(c, a @ masks[4])
    with pytest.raises(ValueError, match="mask 4 is drawn twice"):
        deal(Request(Kind.MASK, (), (3, 2), mask_id=4), Key(2), masks)
    with pytest.raises(ValueError, match="fixed triple for mask 5, which was never drawn"):
        deal(Request(Kind.FIXED_TRIPLE, (5, 3), (3, 2), Bilinear.MATMUL, mask_id=5), Key(2), masks)
    req = Request(Kind.FIXED_TRIPLE, (5, 3), (3, 2), Bilinear.MATMUL, mask_id=4)
    assert material_nbytes(req) == 8 * 10 and material_nbytes(req, 0) == 0  # only party 1's c1 is sent
    assert material_nbytes(Request(Kind.MASK, (), (3, 2), mask_id=4)) == 0


@given(seeds)
@settings(max_examples=5)
def test_beaver_with_a_fixed_operand_is_exact_over_many_products(seed):
    g = Key(seed).generator()
    w = torch.randint(-(2**63), 2**63 - 1, (4, 3), generator=g)
    xs = [torch.randint(-(2**63), 2**63 - 1, (2, 4), generator=g) for _ in range(3)]

    def program(ctx):
        ws = share_from(ctx, 0, w if ctx.rank == 0 else None, (4, 3), Key(seed).fold_in(1))
        (m,) = mask_operands(ctx, [ws])
        outs = []
        for i, x in enumerate(xs):
            xsh = share_from(ctx, 1, x if ctx.rank == 1 else None, (2, 4), Key(seed).fold_in(2 + i))
            outs.append(reveal_to(ctx, 1, beaver_fixed(ctx, xsh, m, Bilinear.MATMUL)))
        return outs

    outs = simulate(program, dealer_key=Key(seed).fold_in(99)).outputs[1]
    for x, out in zip(xs, outs):
        assert torch.equal(out, x @ w)


def test_data_owner_view_with_reused_masks_is_independent_of_the_weights():
    """Over several batches with the same mask, the data owner's received words have the same byte
    distribution for two different weight matrices (chi-square contingency, α = 1e-3)."""

    def view(w):
        counts = torch.zeros(256, dtype=torch.int64)
        for r in range(8):
            def program(ctx):
                ws = share_from(ctx, 0, w if ctx.rank == 0 else None, tuple(w.shape), Key(100 + r))
                (m,) = mask_operands(ctx, [ws])
                for i in range(4):
                    x = share_from(ctx, 1, encode(torch.ones(3, 6)) if ctx.rank == 1 else None, (3, 6), Key(200 + i))
                    matmul(ctx, x, m)
            res = simulate(program, dealer_key=Key(300 + r), record=True)
            for t in res.transcripts[1]:
                counts += torch.bincount(t.contiguous().view(torch.uint8).reshape(-1).long(), minlength=256)
        return counts

    w1 = encode(torch.randn(6, 4, generator=Key(1).generator(), dtype=torch.float64))
    w2 = encode(torch.full((6, 4), 3.0, dtype=torch.float64))
    table = torch.stack([view(w1), view(w2)])
    assert chi2_contingency(table.numpy()).pvalue > 1e-3
    # power: the same test on the weights' own bytes tells them apart
    raw = torch.stack([torch.bincount(t.repeat(50, 1).view(torch.uint8).reshape(-1).long(), minlength=256) for t in (w1, w2)])
    raw = raw[:, raw.sum(0) > 0]
    assert chi2_contingency(raw.numpy()).pvalue < 1e-3


def test_sliced_comparison_is_exact_and_costs_rounds_per_slice():
    from dpfunc.mpc import ltz

    x = torch.randint(-(2**63), 2**63 - 1, (5, 10), generator=Key(3).generator())

    def program(slice_elements):
        def run(ctx):
            xs = share_from(ctx, 1, x if ctx.rank == 1 else None, (5, 10), Key(4))
            return reveal_to(ctx, 1, ltz(ctx, xs, slice_elements))
        return run

    whole = simulate(program(None), dealer_key=Key(5))
    sliced = simulate(program(7), dealer_key=Key(5))
    assert torch.equal(whole.outputs[1], (x < 0).long()) and torch.equal(sliced.outputs[1], (x < 0).long())
    # 1 sharing + 1 reveal message; 8 rounds per slice of 7 elements (8 slices for 50)
    assert whole.stats[1].rounds == 2 + 8 and sliced.stats[1].rounds == 2 + 8 * 8
    with pytest.raises(RuntimeError, match="ltz: slice_elements must be an int >= 1, got 0"):
        simulate(program(0), dealer_key=Key(5))


@pytest.mark.parametrize("approx", [TanhApprox(), TanhApprox(pieces=5, degree=7, odd=False)], ids=["odd", "full-range"])
def test_both_tanh_forms_match_their_oracle(approx):
    from dpfunc.mpc import tanh

    assert approx.max_error() < 1e-4
    xf = torch.cat([torch.linspace(-7, 7, 701, dtype=torch.float64), torch.tensor([-100.0, 100.0, 0.0, 5.0, -5.0])])

    def program(ctx):
        xs = share_from(ctx, 1, encode(xf) if ctx.rank == 1 else None, tuple(xf.shape), Key(1))
        return reveal_to(ctx, 1, tanh(ctx, xs, approx))

    res = simulate(program, dealer_key=Key(2))
    out = decode(res.outputs[1])
    assert (out - approx.plaintext(xf)).abs().max() < 8e-5  # fixed point: a few ulps times the coefficients
    assert (out - torch.tanh(xf)).abs().max() < 1.5e-4
    # the odd form: the sign's carry tree (7 rounds), |x| (its conversion and product in one round),
    # 2 comparisons (8 rounds), masking v, 8 Horner products, the sign (26 rounds); the full-range
    # form: 6 comparisons in one batch, masking v and 7 products (16)
    assert res.stats[1].rounds == 2 + (26 if approx.odd else 16)


def test_tanh_approx_validates_odd():
    with pytest.raises(TypeError, match="TanhApprox: odd must be a bool, got 1"):
        TanhApprox(odd=1)


def test_sliced_elementwise_product_is_exact_in_one_round():
    from dpfunc.mpc import beaver

    g = Key(8).generator()
    x = torch.randint(-(2**63), 2**63 - 1, (3, 11), generator=g)
    y = torch.randint(-(2**63), 2**63 - 1, (3, 11), generator=g)

    def program(slice_elements):
        def run(ctx):
            xs = share_from(ctx, 1, x if ctx.rank == 1 else None, (3, 11), Key(1))
            ys = share_from(ctx, 0, y if ctx.rank == 0 else None, (3, 11), Key(2))
            return reveal_to(ctx, 1, beaver(ctx, xs, ys, Bilinear.MUL, slice_elements=slice_elements))
        return run

    for limit in (None, 5, 1):
        res = simulate(program(limit), dealer_key=Key(3), chunk_bytes=64)
        assert torch.equal(res.outputs[1], x * y)
        assert res.stats[1].rounds == 4  # two sharings, one product round (sliced or not), the reveal
    with pytest.raises(RuntimeError, match="beaver: slice_elements must be an int >= 1, got 0"):
        simulate(program(0), dealer_key=Key(3))


def test_dealer_replay_gives_the_same_material_byte_for_byte():
    """DealerSource.replay (the three-process dealer after its first batch) against running the
    program for every batch: the same bytes to each party; a batch that keeps a run-time mask is not
    replayable."""
    from dpfunc.mpc.context import DEALER, Context, DealerSource, Request

    model = SmallCNN(key=Key(3), widths=(4, 8), groups=2).eval()
    program = compile_module(model)
    shape = (2, 1, 8, 8)

    def dealer(replay: bool) -> DealerSource:
        src = DealerSource(Key(11))
        ctx = Context(DEALER, None, src)
        shared = share_model(ctx, program, None, key=Key(0))
        reqs = None
        for b in range(3):
            if replay and reqs is not None:
                src.replay(reqs)
                continue
            if b == 0:
                src.record()
            encrypted_inference(ctx, program, shape, key=Key(b), model=shared)
            if b == 0:
                reqs = src.stop_recording()
        assert reqs is not None and len(reqs) > 10
        return src

    ran, replayed = dealer(False), dealer(True)
    assert ran.requests == replayed.requests
    for rank in (0, 1):
        assert torch.equal(ran.flat(rank), replayed.flat(rank))
    src = DealerSource(Key(1))
    src.record()
    src.draw(Request(Kind.MASK, (), (3,), mask_id=(1 << 40) + 1))  # a run-time mask never released
    assert src.stop_recording() is None
