"""Student-level (or image-level) DP-SGD from Opacus pieces.

Privacy unit ``student``: one student's many frames are one unit. Each step
  1. samples units by Poisson sampling at rate q = units_per_batch / units (Opacus
     ``UniformWithReplacementSampler`` over the *units*, not the frames — so the sampling the code does
     is the sampling the accountant assumes);
  2. draws ``frames_per_unit`` of each sampled unit's frames (without replacement; all of them if it
     has fewer);
  3. computes per-frame gradients with Opacus' ``GradSampleModule`` and sums them per unit — the unit's
     gradient is the gradient of the sum of its frames' losses;
  4. clips each unit's gradient to ``max_grad_norm`` C, adds N(0, σ²C²) to the sum and divides by the
     expected number of units (Opacus ``DPOptimizer``, whose clipping operates on whatever rows
     ``p.grad_sample`` holds: here one row per unit).
One student changes at most one clipped row of one step's sum, so the sampled Gaussian mechanism at
(σ, q) per step is exactly what the accountant composes. ``image`` is the same code with every frame its
own unit (standard Opacus DP-SGD with Poisson sampling).

Empty Poisson batches still take a step: the update is pure noise. Skipping it would make the number
of updates depend on the data.

Randomness: by default the unit sampling, the frame choice and the noise come from OS entropy. The
amplification-by-sampling argument needs the sample to be secret, and noise that anyone can regenerate
from a config seed protects nothing; ``reproducible=True`` derives them from ``seed`` instead, for tests
and experiments only.
"""

from __future__ import annotations

import math
import secrets
import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class PrivateTrainer:
    """DP-SGD over privacy units. See the module docstring for what one step does.

    ``frames`` yields ``(tensor, label)``; ``unit_ids`` holds one unit id per frame (the student id),
    or None for unit ``image``. ``units_per_batch`` is the *expected* number of units per step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, frames: Dataset,
                 unit_ids: Sequence[str] | None, units_per_batch: int, frames_per_unit: int,
                 noise_multiplier: float, max_grad_norm: float, seed: int | None = None, *,
                 reproducible: bool = False, grad_sample_mode: str = "hooks") -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        n_frames = len(frames)  # type: ignore[arg-type]
        if n_frames == 0:
            raise ValueError("the school has no training frames")
        if unit_ids is None:
            unit_ids = [str(i) for i in range(n_frames)]
            self.privacy_unit = "image"
        else:
            self.privacy_unit = "student"
            if len(unit_ids) != n_frames:
                raise ValueError(f"unit_ids has {len(unit_ids)} entries for {n_frames} frames (one per frame needed)")
        if units_per_batch < 1:
            raise ValueError(f"units_per_batch must be >= 1, got {units_per_batch}")
        if frames_per_unit < 1:
            raise ValueError(f"frames_per_unit must be >= 1, got {frames_per_unit}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")

        index: dict[str, int] = {}
        members: list[list[int]] = []
        for frame, uid in enumerate(unit_ids):
            u = index.setdefault(str(uid), len(index))
            if u == len(members):
                members.append([])
            members[u].append(frame)
        self.unit_names = list(index)
        self._members = [torch.tensor(m, dtype=torch.long) for m in members]
        self.num_units = len(members)
        if units_per_batch > self.num_units:
            warnings.warn(f"units_per_batch {units_per_batch} exceeds the {self.num_units} {self.privacy_unit}s; "
                          f"every unit is sampled every step (q = 1)", stacklevel=2)
        from privacy.planner import sampling  # the planner and the client use the same rule

        self.sample_rate, self.steps_per_epoch = sampling(self.num_units, units_per_batch)
        self.expected_units = self.sample_rate * self.num_units
        self.frames_per_unit = frames_per_unit if self.privacy_unit == "student" else 1
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.frames = frames

        def generator(offset: int) -> torch.Generator:
            g = torch.Generator()
            g.manual_seed((int(seed) * 1_000_003 + offset) if reproducible and seed is not None else secrets.randbits(63))
            return g

        if reproducible and seed is None:
            raise ValueError("reproducible=True needs a seed")
        self._frame_gen = generator(1)
        self._sampler = UniformWithReplacementSampler(num_samples=self.num_units, sample_rate=self.sample_rate,
                                                      generator=generator(2), steps=self.steps_per_epoch)
        self.model = model
        model.train()
        self.private_model = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True,
                                              force_functorch=grad_sample_mode == "functorch")
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=self.max_grad_norm, expected_batch_size=self.expected_units,
                                     loss_reduction="mean", generator=generator(3))
        self.steps_done = 0

    # ------------------------------------------------------------------------------------------
    def _frames_of(self, units: list[int]) -> tuple[list[int], list[int]]:
        """Frame indices for the sampled units, and for each frame its row (0..len(units)-1)."""
        frame_idx: list[int] = []
        row_of_frame: list[int] = []
        for row, u in enumerate(units):
            members = self._members[u]
            if len(members) > self.frames_per_unit:
                pick = torch.randperm(len(members), generator=self._frame_gen)[: self.frames_per_unit]
                chosen = members[pick].tolist()
            else:
                chosen = members.tolist()
            frame_idx.extend(chosen)
            row_of_frame.extend([row] * len(chosen))
        return frame_idx, row_of_frame

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.optimizer.params if p.requires_grad]

    def step(self, units: list[int], loss_fn: LossFn) -> tuple[float, int]:
        """One DP step on the given unit indices. Returns (sum of frame losses, frames used)."""
        self.optimizer.zero_grad(set_to_none=True)
        params = self._params()
        loss_sum, n_frames = 0.0, 0
        if units:
            frame_idx, rows = self._frames_of(units)
            x, y = default_collate([self.frames[i] for i in frame_idx])
            losses = loss_fn(self.private_model, x, y)
            if not isinstance(losses, torch.Tensor) or losses.shape != (len(frame_idx),):
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(f"loss_fn must return one loss per frame, shape ({len(frame_idx)},); got {got}")
            losses.sum().backward()
            row_index = torch.tensor(rows, dtype=torch.long)
            for p in params:
                gs = p.grad_sample
                if gs is None:  # parameter not used in this forward: zero gradient for every unit
                    p.grad_sample = torch.zeros((len(units), *p.shape), dtype=p.dtype)
                    continue
                if isinstance(gs, list):
                    gs = torch.cat(gs, dim=0)
                # the unit's gradient = sum of its frames' gradients (then clipped per unit by DPOptimizer)
                p.grad_sample = torch.zeros((len(units), *gs.shape[1:]), dtype=gs.dtype).index_add_(0, row_index, gs)
            loss_sum, n_frames = float(losses.detach().sum()), len(frame_idx)
        else:
            for p in params:  # empty Poisson batch: clipped sum is zero, the step adds noise only
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss_sum, n_frames

    def train_epoch(self, loss_fn: LossFn) -> dict:
        """``steps_per_epoch`` DP steps; each step's units are a fresh Poisson sample."""
        self.model.train()
        total_loss, total_frames, steps, units_seen, empty = 0.0, 0, 0, 0, 0
        for units in self._sampler:
            loss_sum, n = self.step(list(units), loss_fn)
            total_loss += loss_sum
            total_frames += n
            units_seen += len(units)
            empty += not units
            steps += 1
        return {"steps": steps, "loss": total_loss / max(total_frames, 1), "frames": total_frames,
                "units": units_seen, "empty_steps": empty}

    def close(self) -> None:
        """Detach Opacus' hooks from ``model`` (call before evaluating or reusing it elsewhere)."""
        self.private_model._close()
