"""How a DP step's noise is drawn, on both clipping paths: from a CSPRNG stream (privacy/secure_random.py) in
Opacus' ``secure_mode`` form, or, for a seeded torch generator (``reproducible`` training), Opacus' own draw.

Its own module so that privacy/engine.py (the per-sample path's ``DPOptimizer``) and privacy/student_clipping.py
(``ClippedSumDPOptimizer``) take the one :class:`CSPRNGNoise` without importing each other.
"""

from __future__ import annotations

from typing import Any

import torch

from privacy.secure_random import SecureRandom


def gaussian_noise(std: float, reference: torch.Tensor, stream: SecureRandom, secure_mode: bool) -> torch.Tensor:
    """N(0, std²) noise shaped, typed and placed like ``reference``, from ``stream``. With ``secure_mode``
    (privacy/engine.py ``SECURE_NOISE``) each coordinate is four standard normals summed and halved, Opacus'
    form; the sum and the scaling are in float64, rounded once to the reference's dtype. Drawn in chunks of
    :data:`_NOISE_CHUNK` coordinates, so a large layer's float64 draws never sit in memory four times over."""
    draws, n = (4 if secure_mode else 1), reference.numel()
    out = torch.empty(n, dtype=reference.dtype)
    for start in range(0, n, _NOISE_CHUNK):
        m = min(_NOISE_CHUNK, n - start)
        z = stream.normal(draws * m)
        if secure_mode:
            z = z.view(draws, m).sum(0).mul_(0.5)
        out[start:start + m] = z.mul_(std)
    return out.view(reference.shape).to(device=reference.device)


#: coordinates per draw of :func:`gaussian_noise` (2^18: 8 MB of float64 normals at four draws each)
_NOISE_CHUNK = 1 << 18


class CSPRNGNoise:
    """Mixin for Opacus' DP optimizers (first among the bases): THE noise draw of both clipping paths. When the
    optimizer's ``generator`` is a :class:`SecureRandom` stream, the noise of every parameter is
    :func:`gaussian_noise` from it; a torch generator (the ``reproducible`` path) or σ = 0 leaves Opacus' own
    ``add_noise``, so the seeded path stays Opacus' bit for bit."""

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        opt: Any = self
        std = getattr(opt, "_adjusted_noise_multiplier", opt.noise_multiplier) * opt.max_grad_norm
        if not isinstance(opt.generator, SecureRandom) or std == 0:
            super().add_noise()  # type: ignore[misc]
            return
        for p in opt.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + gaussian_noise(std, p.summed_grad, opt.generator, opt.secure_mode)).view_as(p)
            _mark_as_processed(p.summed_grad)
