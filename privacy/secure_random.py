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

Not covered: the key lives in the process' memory while the stream is used (someone who can read that memory
can read the school's data too). A stream is never copied: pickling and deep copies are refused and a forked
child may not draw from its parent's stream, since two copies would draw the same numbers.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_TWO_POW_MINUS_53 = 2.0 ** -53


class SecureRandom:
    """One AES-256-CTR stream, and the draws DP-SGD needs from it. Not thread-safe: one per randomness source."""

    def __init__(self, *, _key: bytes | None = None, _counter: bytes = bytes(16)) -> None:
        # `_key`/`_counter` exist for the tests' known-answer check only; training never passes them.
        key = os.urandom(32) if _key is None else _key
        if len(key) != 32 or len(_counter) != 16:
            raise ValueError("AES-256-CTR needs a 32-byte key and a 16-byte initial counter block")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_counter)).encryptor()
        self._pid = os.getpid()

    def __reduce__(self) -> object:
        raise TypeError("a SecureRandom is never copied or pickled: the copy would draw the same numbers")

    # ------------------------------------------------------------------------------------ bits
    def random_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        if os.getpid() != self._pid:
            raise RuntimeError("a SecureRandom cannot draw in a forked child: it would repeat its parent's numbers")
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
        """``n`` independent N(0, 1) draws in float64, by Box–Muller: for u1 in (0, 1] and u2 in [0, 1),
        √(−2 ln u1)·cos(2πu2) and √(−2 ln u1)·sin(2πu2) are two independent standard normals (an exact
        transform; the 53-bit u1 bounds a draw at √(106 ln 2) ≈ 8.6, a tail of probability 2^-53)."""
        pairs = (int(n) + 1) // 2
        radius = torch.sqrt(-2.0 * torch.log(self.uniform(pairs, open_at="left")))
        angle = self.uniform(pairs).mul_(2.0 * math.pi)
        return torch.cat((radius * torch.cos(angle), radius.mul_(torch.sin(angle))))[: int(n)]

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
