"""How a DP step's noise is drawn, on both clipping paths: from a CSPRNG stream (privacy/secure_random.py) in
Opacus' ``secure_mode`` form, or, for a seeded torch generator (``reproducible`` training), Opacus' own draw.

Its own module so that privacy/engine.py (the per-sample path's ``DPOptimizer``) and privacy/student_clipping.py
(``ClippedSumDPOptimizer``) take the one :class:`CSPRNGNoise` without importing each other.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from privacy.secure_random import SecureRandom


def gaussian_noise(std: float, reference: torch.Tensor, stream: SecureRandom, secure_mode: bool) -> torch.Tensor:
    """N(0, std²) noise shaped, typed and placed like ``reference``, from ``stream`` (:func:`gaussian_noise_like`
    for one tensor)."""
    return gaussian_noise_like(std, [reference], stream, secure_mode)[0]


def gaussian_noise_like(std: float, references: Sequence[torch.Tensor], stream: SecureRandom,
                        secure_mode: bool) -> list[torch.Tensor]:
    """N(0, std²) noise for each of ``references``, shaped, typed and placed like it, every coordinate
    independent, all drawn by ONE call to ``stream`` (a step's noise for all parameters at once: per tensor,
    the fixed cost of a draw was paid 90 times a HAFNet step). With ``secure_mode`` (privacy/engine.py
    ``SECURE_NOISE``) each coordinate is four standard normals summed and halved, Opacus' form; the sum and
    the scaling are in float64, rounded once to the reference's dtype
    (:meth:`SecureRandom.normal_sums_into`). The stream's buffers are a few hundred KB whatever the model's
    size; the drawn noise itself is one tensor of all the coordinates, in the references' dtype."""
    return _noise_in_one_tensor(std, references, stream, secure_mode)[1]


def _noise_in_one_tensor(std: float, references: Sequence[torch.Tensor], stream: SecureRandom,
                         secure_mode: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """:func:`gaussian_noise_like`'s draw, and the one tensor all of its noise tensors are views of (None when
    some had to be converted to another dtype or device, so that they are copies)."""
    terms, scale = (4, 0.5 * std) if secure_mode else (1, std)
    dtypes = {r.dtype for r in references}
    # one dtype the stream writes (float32 or float64): drawn in it; anything else (mixed, half): float64, then
    # rounded to each reference's dtype — still one rounding from the float64 value
    draw_dtype = dtypes.pop() if len(dtypes) == 1 and references[0].dtype in (torch.float32, torch.float64) \
        else torch.float64
    flat = stream.normal_sums_into(torch.empty(sum(r.numel() for r in references), dtype=draw_dtype), terms, scale)
    pieces = torch.split(flat, [r.numel() for r in references])   # views, in the references' order
    in_place = all((r.dtype, r.device) == (draw_dtype, flat.device) for r in references)
    noise = [piece.view(r.shape) if (r.dtype, r.device) == (draw_dtype, flat.device)
             else piece.view(r.shape).to(dtype=r.dtype, device=r.device) for piece, r in zip(pieces, references)]
    return (flat if in_place else None), noise


class CSPRNGNoise:
    """Mixin for Opacus' DP optimizers (first among the bases): THE noise draw of both clipping paths. When the
    optimizer's ``generator`` is a :class:`SecureRandom` stream, the noise of all parameters is one
    :func:`gaussian_noise_like` draw from it; a torch generator (the ``reproducible`` path) or σ = 0 leaves
    Opacus' own ``add_noise``, so the seeded path stays Opacus' bit for bit."""

    #: after a CSPRNG draw: the one tensor every ``p.grad`` is a view of (the noised sums), for a scaling of all
    #: of them in one call (``ClippedSumDPOptimizer.scale_grad``); None otherwise
    noised_grads: torch.Tensor | None = None

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        opt: Any = self
        opt.noised_grads = None
        std = getattr(opt, "_adjusted_noise_multiplier", opt.noise_multiplier) * opt.max_grad_norm
        if not isinstance(opt.generator, SecureRandom) or std == 0:
            super().add_noise()  # type: ignore[misc]
            return
        summed = [p.summed_grad for p in opt.params]
        for s in summed:
            _check_processed_flag(s)
        flat, noise = _noise_in_one_tensor(std, summed, opt.generator, opt.secure_mode)
        # the sums added into the step's fresh noise tensor, in one call (x + y == y + x in IEEE): no new tensor
        # per parameter; each p.grad is a view of that tensor, which no later step reuses
        torch._foreach_add_(noise, summed)
        for p, s, noised in zip(opt.params, summed, noise):
            p.grad = noised.view_as(p)
            _mark_as_processed(s)
        opt.noised_grads = flat
