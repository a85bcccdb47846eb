"""``make_private``: an ordinary torch training loop, made differentially private.

::

    model, optimizer, loader = make_private(model, optimizer, loader, key=Key(seed),
                                            noise_multiplier=1.1, max_grad_norm=1.0)
    for x, y in loader:                       # Poisson batches from the key
        loss = criterion(model(x), y)         # unchanged
        loss.backward()                       # unchanged (cheap: only d loss / d output)
        optimizer.step()                      # per-example grads → clip → noise once → torch step
        optimizer.zero_grad()
    optimizer.epsilon(delta=1e-5)

How it works (no attributes on the user's parameters or modules; hooks only during a forward):

1. :class:`PrivateModule` runs the training forward — with the fast engine, the engine's tapped
   forward, kept with its graph — and returns the output as a fresh leaf tensor.
   ``loss.backward()`` therefore only computes ``c = ∂loss/∂output`` (one row per example).
2. ``optimizer.step()`` (:class:`~dpfunc.bridge.optimizer.DPOptimizer`, three named phases) runs the
   one backward from ``s·c`` (``s`` = batch size for a mean-reduced loss, 1 for a sum) through the
   kept graph — exactly example ``i``'s gradient of the user's loss — and clips; at the end of a
   logical batch :func:`dpfunc.dp_aggregate` adds noise once, divides by the expected batch size and
   records the step in its ledger; the private mean is written to ``p.grad`` and the user's own
   torch optimizer steps. A step with the fast engine therefore costs one forward and one backward,
   as the functional path does. (``grad_sample_mode="vmap"`` runs a second, vmapped forward.)

This module prepares model, optimizer and loader (:func:`make_private`, :class:`PrivacyEngine`);
the optimizer lives in :mod:`dpfunc.bridge.optimizer`.

Formal guarantees:
    Each logical step is one Poisson-subsampled Gaussian mechanism with noise multiplier σ and
    sensitivity ``max_grad_norm`` (add/remove-one), provided the user's loss is a sum or mean over
    examples of terms that depend on one example each (true for ``CrossEntropyLoss``, ``MSELoss``
    … without class weights) and the model has no cross-example layers (``validate`` / ``assert_valid``
    are run). Terms of the loss that depend on parameters directly (an L2 penalty) are NOT part of the
    private gradient; use the optimizer's ``weight_decay``.

Edge cases:

    ===============================  ==============================================================
    empty Poisson batch              a forward with 0 rows; the step releases pure noise
    forward without backward         ignored (e.g. logging a batch in train mode)
    ``step()`` with nothing pending  RuntimeError (call ``model(x)`` and ``loss.backward()`` first)
    micro-batches                    noise and the torch step only at the end of a logical batch
    dropout                          per-example masks from ``dropout_key.fold_in(forward)``; the
                                     gradient pass replays the same masks (vmap "different")
    ===============================  ==============================================================
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dpfunc import accounting
from dpfunc.clipping import Clipping, FlatClipping, PerLayerClipping
from dpfunc.keys import Key, run_keys
from dpfunc.adaptive_clipping import AdaptiveClipping, AdaptiveDPConfig
from dpfunc.private import DPConfig
from dpfunc.accounting.ledger import PrivacyLedger
from dpfunc.bridge.loader import LogicalBatchPlan, poisson_loader
from dpfunc.bridge.module import PrivateModule, _Shared
from dpfunc.bridge.optimizer import DPOptimizer
from dpfunc.bridge.validate import assert_valid

__all__ = ["PrivateModule", "DPOptimizer", "make_private", "PrivacyEngine"]

_REDUCTIONS = ("mean", "sum")
_MODES = ("fast", "vmap")


def _clipping(fn: str, clipping: Any, max_grad_norm: Any) -> Clipping:
    if isinstance(clipping, (FlatClipping, PerLayerClipping, AdaptiveClipping)):
        return clipping
    if clipping == "adaptive":  # built once q is known (σ_b = expected batch size / 20)
        return clipping
    if clipping == "flat":
        return FlatClipping(max_grad_norm)
    if clipping == "per_layer":
        return PerLayerClipping(max_grad_norm)
    raise ValueError(f"{fn}: clipping must be 'flat', 'per_layer', 'adaptive' or a FlatClipping/PerLayerClipping/"
                     f"AdaptiveClipping, got {clipping!r}")


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    key: Key,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: int | None = None,
    criterion: nn.Module | None = None,
    loss_reduction: str | None = None,
    poisson_sampling: bool = True,
    clipping: str | Clipping = "flat",
    grad_sample_mode: str = "fast",
    max_physical_batch_size: int | None = None,
    chunk_size: int | None = None,
    accountant: str | None = None,
    budget: Any = None,
    validate: bool = True,
    secure: bool = False,
    world: Any = None,
) -> tuple[PrivateModule, DPOptimizer, DataLoader]:
    """Make an ordinary torch training setup differentially private (see the module docstring).

    Args:
        module: the model; its parameters are trained in place by the user's optimizer (as before).
        optimizer: the user's torch optimizer over ``module``'s parameters.
        data_loader: a ``DataLoader`` over a map-style dataset.
        key: the run's secret key (``Key(seed)``); noise, Poisson batches and dropout masks derive from
            :func:`~dpfunc.keys.run_keys` (``.noise``, ``.sampling``, ``.dropout``). Keep the seed secret: whoever knows it can subtract the noise.
        max_grad_norm: the clipping bound ``C``.
        noise_multiplier: σ; or give ``target_epsilon``, ``target_delta`` and ``epochs`` to calibrate it.
        criterion: optional, for its ``reduction`` (``"mean"`` or ``"sum"``); default reduction "mean".
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss used in ``backward`` reduces over the batch.
        poisson_sampling: True (default): Poisson batches with ``q = 1/len(data_loader)``. False keeps
            the loader's own batches and warns: the accounting then assumes sampling that did not happen
            (shuffling can cost more ε than the Poisson analysis reports).
        clipping: ``"flat"``, ``"per_layer"`` (``C`` split equally over layers), ``"adaptive"`` (Andrew et
            al. 2021: ``max_grad_norm`` is the initial bound, which follows the median gradient norm with
            η = 0.2 and count noise σ_b = expected batch size / 20; see :mod:`dpfunc.adaptive_clipping`)
            or a Clipping object (an :class:`~dpfunc.AdaptiveClipping` for other adaptive settings).
        grad_sample_mode: ``"fast"`` (ghost norms; layers without a rule fall back to vmap) or ``"vmap"``.
        max_physical_batch_size: split logical batches into micro-batches of at most this size; noise
            is added once per logical batch.
        chunk_size: vmap chunking (memory bound of the vmap path). With dropout, chunked draws no
            longer replay the forward's masks (the gradient is still clipped, so privacy holds).
        accountant: method of ``dpfunc.accounting`` for ``epsilon`` and calibration (``"pld"``, ``"rdp"``);
            None (default): PLD, or the discrete Gaussian's RDP bound with ``secure=True``.
        budget: optional ``dpfunc.accounting.PrivacyBudget`` enforced before each step.
        validate: run :func:`~dpfunc.bridge.assert_valid` on the module (refuses BatchNorm etc.).
        secure: secure mode (:mod:`dpfunc.secure_noise`, needs ``cryptography``): discrete Gaussian noise
            on a grid from a CSPRNG keyed by OS entropy — NOT reproducible from ``key`` — recorded in the
            ledger as such, so ``optimizer.epsilon(δ)`` is the discrete Gaussian's bound; with
            ``target_epsilon`` σ is calibrated with that bound. Only the RDP accountant applies.
        world: data-parallel training on several processes (:func:`dpfunc.distributed.init_world`
            under ``torchrun``): every rank calls ``make_private`` with the same arguments and key; its
            loader yields its slice of the shared Poisson batch, ``optimizer.step()`` all-reduces the
            clipped sums before the noise, and every rank adds the same noise from the shared key — the
            model and ledger stay identical on every rank (see :mod:`dpfunc.distributed`). Save
            checkpoints on rank 0 only. None (default): one process.

    Returns:
        ``(module, optimizer, data_loader)``: a :class:`PrivateModule`, a :class:`DPOptimizer` (with
        ``.ledger``, ``.epsilon(delta)``, ``.state_dict()``), and the Poisson ``DataLoader``.
    """
    fn = "make_private"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be an nn.Module, got {type(module).__name__}")
    if isinstance(module, PrivateModule):
        raise ValueError(f"{fn}: the module is already private (a PrivateModule)")
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
        raise TypeError(f"{fn}: optimizer must be a (non-private) torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(key, Key):
        raise TypeError(f"{fn}: key must be a dpfunc.Key (e.g. Key(seed)), got {type(key).__name__}")
    if grad_sample_mode not in _MODES:
        raise ValueError(f"{fn}: grad_sample_mode must be one of {_MODES}, got {grad_sample_mode!r}")
    reduction = loss_reduction
    if criterion is not None and getattr(criterion, "reduction", None) is not None:
        if reduction is not None and reduction != criterion.reduction:
            raise ValueError(f"{fn}: loss_reduction={reduction!r} disagrees with criterion.reduction={criterion.reduction!r}")
        reduction = criterion.reduction
    reduction = reduction or "mean"
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: the loss must reduce by 'mean' or 'sum' over the batch, got {reduction!r}")
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in trainable:
                raise ValueError(f"{fn}: the optimizer holds a parameter {tuple(p.shape)} that is not a trainable parameter "
                                 f"of the module. If you called `model = fix(model)`: fix returns a NEW module, so build "
                                 f"the optimizer after it, from the new module's parameters (`optimizer = "
                                 f"torch.optim.SGD(model.parameters(), ...)`)")
    if validate:
        assert_valid(module)
    clip = _clipping(fn, clipping, max_grad_norm)
    if not isinstance(secure, bool):
        raise TypeError(f"{fn}: secure must be a bool, got {secure!r}")
    if world is not None:
        from dpfunc.distributed import World

        if not isinstance(world, World):
            raise TypeError(f"{fn}: world must be a dpfunc.distributed.World (from init_world), got {type(world).__name__}")
        if world.size > 1 and not poisson_sampling:
            raise ValueError(f"{fn}: data-parallel training needs poisson_sampling=True (the ranks draw the same batch "
                             f"from the shared key)")
        if world.size > 1 and (clip == "adaptive" or isinstance(clip, AdaptiveClipping)):
            raise ValueError(f"{fn}: adaptive clipping runs in one process (the count of unclipped examples is not summed "
                             f"over {world.size} ranks); use clipping='flat' or 'per_layer' for data-parallel training")
    rank, world_size = (world.rank, world.size) if world is not None else (0, 1)
    if secure and accountant not in (None, "rdp"):
        raise ValueError(f"{fn}: secure=True draws discrete Gaussian noise, which only the RDP accountant bounds; "
                         f"pass accountant='rdp' or leave it out (got accountant={accountant!r})")

    keys = run_keys(key)
    sample_key, dropout_key = keys.sampling, keys.dropout
    if world_size > 1:  # each rank draws the dropout masks of its own rows (the same key would repeat them)
        dropout_key = dropout_key.fold_in(rank)
    plan = LogicalBatchPlan()
    loader, q, steps_per_epoch = poisson_loader(
        data_loader, key=sample_key, poisson_sampling=poisson_sampling, max_physical_batch_size=max_physical_batch_size, plan=plan,
        rank=rank, world_size=world_size,
    )
    if not poisson_sampling:
        warnings.warn(f"{fn}: poisson_sampling=False keeps the loader's own batches, but ε is computed as if every "
                      f"example joined each batch independently with probability q = {q:.4g} (Poisson sampling). "
                      f"Shuffled fixed-size batches are not covered by that analysis and can cost more ε than it "
                      f"reports (Chua et al., ICML 2024); keep poisson_sampling=True for the stated guarantee",
                      UserWarning, stacklevel=2)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(f"{fn}: give exactly one of noise_multiplier and target_epsilon (with target_delta and epochs)")
    if target_epsilon is not None:
        if target_delta is None or epochs is None:
            raise ValueError(f"{fn}: target_epsilon needs target_delta and epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"{fn}: epochs must be an int >= 1, got {epochs!r}")
        if secure:
            from dpfunc.accounting.discrete_gaussian import discrete_gaussian_noise_multiplier_for

            noise_multiplier = float(discrete_gaussian_noise_multiplier_for(target_epsilon, target_delta, q, epochs * steps_per_epoch))
        else:
            noise_multiplier = float(accounting.noise_multiplier_for(target_epsilon, target_delta, q, epochs * steps_per_epoch,
                                                                     method=accountant or "pld"))
    if clip == "adaptive":
        clip = AdaptiveClipping(max_grad_norm, 0.5, 0.2, q * len(data_loader.dataset) / 20)
    config = (AdaptiveDPConfig if isinstance(clip, AdaptiveClipping) else DPConfig)(clip, noise_multiplier, q, len(data_loader.dataset))
    shared = _Shared(dropout_key, plan)
    private_module = PrivateModule(module, shared)
    private_module.train(module.training)
    dp_optimizer = DPOptimizer(
        optimizer,
        module=private_module,
        config=config,
        key=key,
        loss_reduction=reduction,
        grad_sample_mode=grad_sample_mode,
        chunk_size=chunk_size,
        sampler=loader.batch_sampler if poisson_sampling else None,
        budget=budget,
        accountant=accountant,
        secure=secure,
        world=world,
    )
    return private_module, dp_optimizer, loader


class PrivacyEngine:
    """Opacus-shaped front door: ``PrivacyEngine(key=...).make_private(...)`` and ``get_epsilon(delta)``.

    Args:
        key: the run's secret key (required: dpfunc never draws a hidden seed).
        accountant: ``"pld"``, ``"rdp"``, or None (default: PLD, or RDP for ``secure=True``).
    """

    def __init__(self, *, key: Key, accountant: str | None = None):
        if not isinstance(key, Key):
            raise TypeError(f"PrivacyEngine: key must be a dpfunc.Key, got {type(key).__name__}")
        self.key = key
        self.accountant = accountant
        self.optimizer: DPOptimizer | None = None

    def make_private(self, *, module, optimizer, data_loader, noise_multiplier, max_grad_norm, **kwargs):
        """As Opacus' ``PrivacyEngine.make_private``; returns ``(module, optimizer, data_loader)``."""
        return self._make(module, optimizer, data_loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, **kwargs)

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon, target_delta, epochs, max_grad_norm, **kwargs):
        """As Opacus' ``make_private_with_epsilon``: σ calibrated so that ``epochs`` epochs spend ``target_epsilon``."""
        return self._make(
            module, optimizer, data_loader, target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs,
            max_grad_norm=max_grad_norm, **kwargs,
        )

    def _make(self, module, optimizer, data_loader, **kwargs):
        kwargs.pop("batch_first", None)  # Opacus argument without meaning here (vmap handles any layout)
        m, o, d = make_private(module, optimizer, data_loader, key=self.key, accountant=self.accountant, **kwargs)
        self.optimizer = o
        return m, o, d

    def get_epsilon(self, delta: float) -> float:
        if self.optimizer is None:
            raise RuntimeError("PrivacyEngine.get_epsilon: call make_private first")
        return self.optimizer.epsilon(delta)

    @property
    def ledger(self) -> PrivacyLedger:
        if self.optimizer is None:
            return PrivacyLedger()
        return self.optimizer.ledger
