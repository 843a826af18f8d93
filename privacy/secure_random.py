"""A cryptographically secure random stream for DP-SGD's draws: AES-256 in counter mode, keyed from the OS.

Why: the guarantee of a school's DP-SGD rests on three draws nobody outside the school may predict — the
Poisson sample of students, the frames drawn of each sampled student, and the Gaussian noise. torch's
generators are Mersenne Twisters (MT19937): 624 consecutive 32-bit outputs give away the whole state, so past
and future draws, and a CPU generator keeps only 32 bits of its seed (2^32 guesses). Opacus' ``secure_mode``
would take torchcsprng's generator, which is unmaintained and does not install for current torch. So the
project draws its own:

* the bits are the AES-256-CTR keystream (the encryption of zeros) of the ``cryptography`` package, under a
  key of 32 bytes from ``os.urandom``, fresh for every :class:`SecureRandom` (so one per randomness source
  per trainer; the counter can start at zero because a key is never used twice). Predicting a draw, or
  telling the stream from uniform bits, means breaking AES-256 (the construction of NIST's CTR_DRBG, without
  its reseeding: one stream lives for one round of training);
* the transforms to the distributions are exact and in float64: uniforms with 53 random bits (every float64
  multiple of 2^-53 in [0, 1), or in (0, 1]), standard normals by Box–Muller (both outputs used), Bernoulli(q)
  as u < q, a random permutation as the order of random 64-bit keys.

The normals are the hot path (DP-SGD's noise: four per trained parameter per step, a million and more for a
small model), so :meth:`SecureRandom.normal_sums_into` draws them in passes of :data:`_PAIRS_PER_PASS`
Box–Muller pairs into buffers the stream keeps (no fresh allocation per draw: a fresh buffer of megabytes is
fresh pages, each faulted in), each pass small enough to stay in a core's cache, and sums and scales them
straight into the caller's tensor. It is the same transform as one draw at a time; only where the
intermediate numbers live changed (docs/dp-speed.md, "The noise from a CSPRNG").

Not covered: the key lives in the process' memory while the stream is used (someone who can read that memory
can read the school's data too), and so do the last pass's keystream and normals in the stream's buffers. A stream is never copied: pickling and deep copies are refused and a forked
child may not draw from its parent's stream, since two copies would draw the same numbers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_POW_MINUS_53 = 2.0 ** -53
# (k·2^-53)·fl(2π) rounds to the same float64 as k·(fl(2π)·2^-53): k·2^-53 and fl(2π)·2^-53 are exact (powers
# of two), so an angle is one multiplication of the 53-bit integer k, the same number as u·2π
_TWO_PI_TIMES_TWO_POW_MINUS_53 = 2.0 * math.pi * _TWO_POW_MINUS_53
# the half angle θ/2 = π·u2 by the same one multiplication: fl(2π) = 2·fl(π), so it is the float64 θ halved,
# exactly
_PI_TIMES_TWO_POW_MINUS_53 = math.pi * _TWO_POW_MINUS_53


def _numpy_has_fast_float64_tan() -> bool:
    """Whether numpy runs its AVX-512 float64 ``tan`` here (its SVML kernel: 0.09 ms for 65,536 values on the
    measuring machine, where torch's ``cos`` and ``sin`` took 0.19 ms each). Without AVX-512 numpy's float64
    ``tan`` is a scalar loop (1.0 ms for the same values), so :meth:`SecureRandom._box_muller` keeps ``cos`` and
    ``sin`` there. numpy's own record of the CPU features it dispatches on (what ``numpy.show_runtime`` prints)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:   # a numpy without that record: the path that is fast everywhere
        return False
    return bool(__cpu_features__.get("AVX512_SKX") or __cpu_features__.get("X86_V4"))


#: cos θ and sin θ of the Box–Muller angle from one ``tan`` of the half angle (:meth:`SecureRandom._box_muller`),
#: where numpy's float64 ``tan`` is vectorised; else from torch's ``cos`` and ``sin``. Both are the exact
#: transform up to the last bits of float64 (docs/privacy.md, "The random numbers").
_TAN_HALF_ANGLE = _numpy_has_fast_float64_tan()

#: Box–Muller pairs per pass of :meth:`SecureRandom.normal_sums_into` (a stream's buffers: 5 MB). Each pass
#: costs a fixed ~20 numpy/torch calls, so small passes lose to Python (2^12 pairs: 150 passes a HAFNet step),
#: and one pass for a whole step loses to memory traffic (its buffers leave the cache between operations):
#: 2^16–2^17 were the fastest of 2^12–2^20 for HAFNet's 315 k parameters (docs/dp-speed.md).
_PAIRS_PER_PASS = 1 << 16


class _NormalBuffers:
    """The buffers one pass of Box–Muller pairs works in, made once per stream (on its first normal draw) and
    reused by every later pass. ``pairs`` pairs at most per pass."""

    def __init__(self, pairs: int) -> None:
        self.pairs = pairs
        self.zeros = bytes(16 * pairs)   # the plaintext: the keystream is the encryption of zeros
        # cryptography's update_into may need up to one block (16 bytes) more room than the data
        self.keystream = bytearray(16 * pairs + 16)
        self.words = np.frombuffer(self.keystream, dtype="<u8", count=2 * pairs)
        self.radius = np.empty(pairs)
        self.angle = torch.empty(pairs, dtype=torch.float64)
        self.normals = torch.empty(2 * pairs, dtype=torch.float64)
        self.sums = np.empty(2 * pairs)


class SecureRandom:
    """One AES-256-CTR stream, and the draws DP-SGD needs from it. Not thread-safe: one per randomness source."""

    def __init__(self, *, _key: bytes | None = None, _counter: bytes = bytes(16)) -> None:
        # `_key`/`_counter` exist for the tests' known-answer check only; training never passes them.
        key = os.urandom(32) if _key is None else _key
        if len(key) != 32 or len(_counter) != 16:
            raise ValueError("AES-256-CTR needs a 32-byte key and a 16-byte initial counter block")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_counter)).encryptor()
        self._pid = os.getpid()
        self._normal_buffers: _NormalBuffers | None = None   # made on the first normal draw

    def __reduce__(self) -> object:
        raise TypeError("a SecureRandom is never copied or pickled: the copy would draw the same numbers")

    # ------------------------------------------------------------------------------------ bits
    def _refuse_forked_child(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a SecureRandom cannot draw in a forked child: it would repeat its parent's numbers")

    def random_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        self._refuse_forked_child()
        return self._encryptor.update(bytes(int(n)))

    def _words(self, n: int) -> np.ndarray:
        """``n`` uniform 64-bit words (little-endian reading of the keystream)."""
        return np.frombuffer(self.random_bytes(8 * n), dtype="<u8")

    def seeds(self, n: int) -> list[int]:
        """``n`` uniform 64-bit seeds, for code that draws from a torch generator of its own (torchvision's
        transforms): torch's CPU generator keeps the low 32 bits of its seed, so each seed gives 32 bits."""
        return self._words(n).tolist()

    # ------------------------------------------------------------------------------------ draws
    def uniform(self, n: int, *, open_at: str = "right") -> torch.Tensor:
        """``n`` float64 uniforms with 53 random bits: in [0, 1) (``open_at="right"``, the default) or in
        (0, 1] (``open_at="left"``, for a logarithm)."""
        if open_at not in ("right", "left"):
            raise ValueError(f"open_at must be 'right' or 'left', got {open_at!r}")
        k = (self._words(n) >> np.uint64(11)).astype(np.float64)
        if open_at == "left":
            k += 1.0
        return torch.from_numpy(k * _TWO_POW_MINUS_53)

    def normal(self, n: int) -> torch.Tensor:
        """``n`` independent N(0, 1) draws in float64 (Box–Muller: :meth:`normal_sums_into`)."""
        return self.normal_sums_into(torch.empty(int(n), dtype=torch.float64))

    def normal_sums_into(self, out: torch.Tensor, terms: int = 1, scale: float = 1.0) -> torch.Tensor:
        """Fill ``out`` (a contiguous float32 or float64 CPU tensor) with independent draws of ``scale`` × the
        sum of ``terms`` independent N(0, 1) draws, and return it. Each sum and its scaling are in float64,
        rounded once to ``out``'s dtype. DP-SGD's secure-mode noise is ``terms=4, scale=σC/2``
        (privacy/noise.py).

        The N(0, 1) draws are Box–Muller's: for u1 in (0, 1] and u2 in [0, 1), both with 53 random bits,
        √(−2 ln u1)·cos(2πu2) and √(−2 ln u1)·sin(2πu2) are two independent standard normals — an exact
        transform (the 53-bit u1 bounds a draw at √(106 ln 2) ≈ 8.6, a tail of probability 2^-53), computed
        in float64 (``log`` by numpy; cos θ and sin θ by torch's ``cos``/``sin``, or, where numpy's float64
        ``tan`` is vectorised, as (1 − t²)/(1 + t²) and 2t/(1 + t²) of t = tan(θ/2), the same numbers to a few
        ulps at half the cost: ``_TAN_HALF_ANGLE``; each library's faster float64 kernel, all to about an ulp).
        Each sum takes its ``terms`` draws from ``terms`` distinct pairs, as Opacus' four
        separate draws would: the two outputs of one pair share its radius (r·cos θ + r·sin θ = √2·r·sin(θ + π/4)
        is one Box–Muller sample, not two), so a sum of both would give the floating-point attack the secure-mode
        form is against half the draws it is meant to face. In a pass of m values the ``terms``·m draws are the
        cos outputs, then the sin outputs, of ``terms``·m/2 pairs, read as ``terms`` rows of m; value j takes
        the cos rows' element j and the sin rows' element j + 1 (mod m): with four terms the cos outputs of
        pairs j and m + j and the sin outputs of pairs j + 1 and m + j + 1. A lone value is drawn as the first of
        two. ``terms`` is 1 or even. Every pair uses two fresh 64-bit words of the keystream, 53 bits of each: a
        pass reads the u1 words of its pairs, then their u2 words."""
        buffers = self._buffers()
        if not (terms == 1 or (terms % 2 == 0 and 2 <= terms <= buffers.pairs)):
            raise ValueError(f"terms must be 1 or an even number up to {buffers.pairs}, got {terms}")
        if out.dtype not in (torch.float32, torch.float64) or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"normal draws go into a contiguous float32/float64 CPU tensor, got {out.dtype} on "
                             f"{out.device}")
        target = out.detach().view(-1).numpy()
        per_pass = max(1, 2 * buffers.pairs // terms)   # values per pass: terms × values ≤ 2 × pairs draws
        cos_rows = terms // 2
        for start in range(0, target.size, per_pass):
            m = min(per_pass, target.size - start)
            width = 2 if terms > 1 and m == 1 else m   # a lone value, too, sums draws of distinct pairs
            rows = self._box_muller(terms * width)[: terms * width].reshape(terms, width)
            into = target[start:start + m]
            sums = into if into.dtype == np.float64 and width == m else buffers.sums[:width]
            if terms == 1:
                np.copyto(sums, rows[0])
            else:
                # the cos rows added in order, as np.sum over them does, by adds (np.sum's axis-0 reduction
                # took twice the time of one add for two rows)
                if cos_rows == 1:
                    np.copyto(sums, rows[0])
                else:
                    np.add(rows[0], rows[1], out=sums)
                for cos_row in rows[2:cos_rows]:
                    np.add(sums, cos_row, out=sums)
                for sin_row in rows[cos_rows:]:        # element j + 1 (mod width): another pair than the cos
                    np.add(sums[:-1], sin_row[1:], out=sums[:-1])
                    sums[-1] += sin_row[0]
            np.multiply(sums[:m], scale, out=into, casting="same_kind")   # float64 product, rounded once to out
        return out

    def _buffers(self) -> _NormalBuffers:
        if self._normal_buffers is None:
            self._normal_buffers = _NormalBuffers(_PAIRS_PER_PASS)
        return self._normal_buffers

    def _box_muller(self, count: int) -> np.ndarray:
        """At least ``count`` (≤ 2 × pairs per pass) N(0, 1) draws in float64, from ⌈count/2⌉ Box–Muller pairs:
        the cos outputs, then the sin outputs. A view of the stream's buffer, valid until its next draw."""
        b = self._buffers()
        pairs = (count + 1) // 2
        self._refuse_forked_child()
        self._encryptor.update_into(memoryview(b.zeros)[: 16 * pairs], b.keystream)
        words = b.words[: 2 * pairs]
        np.right_shift(words, 11, out=words)                   # 53 random bits: k in [0, 2^53)
        # read as int64 (k < 2^53: the same numbers) — numpy converts int64 to float64 faster than uint64
        k_radius, k_angle = words[:pairs].view(np.int64), words[pairs:].view(np.int64)
        radius = b.radius[:pairs]
        np.add(k_radius, 1, out=k_radius)                      # u1 = (k + 1)·2^-53 in (0, 1]: ln u1 is finite
        np.multiply(k_radius, _TWO_POW_MINUS_53, out=radius)
        np.log(radius, out=radius)
        np.multiply(radius, -2.0, out=radius)
        np.sqrt(radius, out=radius)                            # √(−2 ln u1)
        angle = b.angle[:pairs]
        z = b.normals[: 2 * pairs].numpy()
        cos_out, sin_out = z[:pairs], z[pairs:]
        if _TAN_HALF_ANGLE:
            # t = tan(θ/2): cos θ = (1 − t²)/(1 + t²), sin θ = 2t/(1 + t²) — one vectorised tan instead of two
            # calls that cost twice as much together; |t| < 2^54 (θ/2 is never exactly π/2), so t² is finite
            t = angle.numpy()
            np.multiply(k_angle, _PI_TIMES_TWO_POW_MINUS_53, out=t)   # θ/2 = π·u2
            np.tan(t, out=t)
            np.multiply(t, t, out=cos_out)                     # t²
            np.add(cos_out, 1.0, out=sin_out)                  # 1 + t²
            np.divide(radius, sin_out, out=radius)             # r / (1 + t²)
            np.subtract(1.0, cos_out, out=cos_out)
            np.multiply(cos_out, radius, out=cos_out)          # r·cos θ
            np.add(t, t, out=t)                                # 2t (exact)
            np.multiply(t, radius, out=sin_out)                # r·sin θ
            return z
        np.multiply(k_angle, _TWO_PI_TIMES_TWO_POW_MINUS_53, out=angle.numpy())   # 2π·u2, u2 = k·2^-53
        torch.cos(angle, out=b.normals[:pairs])
        torch.sin(angle, out=b.normals[pairs:2 * pairs])
        np.multiply(cos_out, radius, out=cos_out)
        np.multiply(sin_out, radius, out=sin_out)
        return z

    def bernoulli(self, n: int, p: float) -> torch.Tensor:
        """``n`` independent Bernoulli(p) draws as a bool tensor (u < p for u uniform in [0, 1): exact for
        any p that is a multiple of 2^-53, within 2^-53 otherwise)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"a probability must be in [0, 1], got {p}")
        return self.uniform(n) < p

    def randperm(self, n: int) -> torch.Tensor:
        """A uniformly random permutation of 0..n-1 (int64): the order of n random 64-bit keys. Two equal keys
        (probability below n²/2^65) keep their index order, the only departure from uniform."""
        keys = torch.from_numpy(self._words(n).view(np.int64).copy())
        return torch.argsort(keys, stable=True)
