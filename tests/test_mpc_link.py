"""The parties' TCP link (dpfunc.mpc.parties.SocketChannel): bytes in = bytes out, both ways at once,
for messages far larger than the socket buffers; clear errors on a closed or silent peer."""

from __future__ import annotations

import socket
import threading

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dpfunc.keys import Key
from dpfunc.mpc.parties import SocketChannel


def _pair(timeout: float = 20.0) -> tuple[SocketChannel, SocketChannel]:
    """Two ends of a TCP connection on the loopback interface (what the parties use)."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        a = socket.create_connection(srv.getsockname(), timeout=10)
        b, _ = srv.accept()
    return SocketChannel(a, timeout), SocketChannel(b, timeout)


def _both(fn0, fn1):
    out, errors = [None, None], []

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate((fn0, fn1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "exchange hung"
    if errors:
        raise errors[0]
    return out


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from([0, 1, 7, 4096, 3 << 20]),
       dtype=st.sampled_from([torch.int64, torch.uint8, torch.int32]))
@example(seed=1, n=3 << 20, dtype=torch.int64)
def test_exchange_is_bit_exact_both_ways_at_any_size(seed, n, dtype):
    """Both parties send first and receive after (SPMD), so a message larger than the kernel's socket
    buffers (3·2^20 int64 = 24 MiB) would deadlock a send-then-receive link; this one must not."""
    g = Key(seed).generator()
    x0 = torch.randint(-(2**31), 2**31, (n,), generator=g).to(dtype)
    x1 = torch.randint(-(2**31), 2**31, (n,), generator=g).to(dtype)
    c0, c1 = _pair()
    try:
        got0, got1 = _both(lambda: c0.exchange(x0), lambda: c1.exchange(x1))
    finally:
        c0.close(), c1.close()
    assert torch.equal(got0, x1) and torch.equal(got1, x0)
    assert got0.dtype == dtype and got0.shape == x1.shape


def test_send_recv_and_non_contiguous_tensors():
    x = torch.arange(24, dtype=torch.int64).view(4, 6).t()  # not contiguous
    c0, c1 = _pair()
    try:
        _, got = _both(lambda: c0.send(x), lambda: c1.recv(torch.empty(6, 4, dtype=torch.int64)))
        both = _both(lambda: c0.exchange(x), lambda: c1.exchange(x + 1))
    finally:
        c0.close(), c1.close()
    assert torch.equal(got, x) and torch.equal(both[0], x + 1) and torch.equal(both[1], x)


def test_a_closed_or_silent_peer_is_an_error_not_a_hang():
    c0, c1 = _pair(timeout=0.5)
    with pytest.raises(TimeoutError, match="SocketChannel"):
        c0.recv(torch.empty(8, dtype=torch.int64))
    c1.close()
    with pytest.raises(ConnectionError, match="closed the connection"):
        c0.recv(torch.empty(8, dtype=torch.int64))
    c0.close()


def test_run_party_refuses_an_unknown_link():
    from dpfunc.mpc.parties import run_party

    spec = {"model": "cnn", "input_shape": [1, 1, 8, 8], "batches": 1, "party_link": "udp"}
    with pytest.raises(ValueError, match="party_link.*'udp'"):
        run_party("dealer", addr="127.0.0.1", port=1, spec=spec)
