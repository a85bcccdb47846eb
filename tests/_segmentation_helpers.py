"""Shared helpers of the segmentation tests: random patients and flattened gradients."""

from __future__ import annotations

import torch

from dpfunc.segmentation import PatientVolume


def random_patients(seed: int, counts, size: int) -> list[PatientVolume]:
    """Patients ``p0, p1, …`` with ``counts[i]`` random float64 ``size²`` slices and random binary labels
    (from ``torch.Generator().manual_seed(seed)``: the same patients for the same arguments)."""
    g = torch.Generator().manual_seed(seed)
    return [PatientVolume(f"p{i}", torch.rand(s, 1, size, size, generator=g, dtype=torch.float64),
                          (torch.rand(s, size, size, generator=g) > 0.6).long()) for i, s in enumerate(counts)]


def flat(grads: dict) -> torch.Tensor:
    """All gradients of a ``name → tensor`` dict as one vector (in the dict's order)."""
    return torch.cat([g.flatten() for g in grads.values()])


def assert_fast_engine_equals_vmap(model, params, buffers, patients, clip: float, mask) -> None:
    """The fast engine against the vmap oracle (float64) on ``patients`` (four of them, three slices drawn per
    patient, with and without the real-row ``mask``) and on six of their slices as the privacy unit:
    per-unit norms, the clipped sum and the losses."""
    from dpfunc.clipping import FlatClipping
    from dpfunc.keys import Key
    from dpfunc.segmentation import patient_batch, segmentation_engine, slice_batch

    x = patient_batch(patients, [0, 1, 2, 3], 3, Key(2))
    for mask_ in (None, mask):
        fast, oracle = (segmentation_engine(model, FlatClipping(clip), unit="patient", slices_per_patient=3, engine=e)(
            params, buffers, (x,), mask_) for e in ("fast", "vmap"))
        torch.testing.assert_close(fast.grads.norms, oracle.grads.norms, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(flat(fast.grads.grads), flat(oracle.grads.grads), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fast.losses, oracle.losses, rtol=1e-10, atol=1e-12)
    xs = slice_batch(torch.cat([p.images for p in patients]), torch.cat([p.labels for p in patients]), torch.arange(6))
    fast, oracle = (segmentation_engine(model, FlatClipping(clip), unit="slice", engine=e)(params, buffers, (xs,), None)
                    for e in ("fast", "vmap"))
    torch.testing.assert_close(fast.grads.norms, oracle.grads.norms, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(fast.grads.grads), flat(oracle.grads.grads), rtol=1e-9, atol=1e-12)
