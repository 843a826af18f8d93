"""A school's Ed25519 ledger-signing key (not its TLS/node credentials — those are credentials.py).

The private key never leaves the school's state directory (``signing_key.pem``, PKCS#8, mode 0600);
the public key (``signing_key.pub``, SubjectPublicKeyInfo PEM) is what the server and auditors hold.
Signatures are over the ASCII hex of a ledger entry's sha256 hash, base64-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub"


class SigningKeyError(ValueError):
    """A key file is missing, unreadable, of the wrong type or too widely readable."""


def load_or_create_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """The school's signing key from ``<state_dir>/signing_key.pem``; created (0600) on first use.

    Creation uses O_EXCL, so two processes starting at once cannot each make a different key: the
    loser reads the winner's file. A key file readable by group or others is refused, as ssh does.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / SIGNING_KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; fall through and load theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            (state_dir / PUBLIC_KEY_FILE).write_text(public_key_pem(key), encoding="ascii")
            return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningKeyError(f"{path}: permissions {oct(mode)} let others read the signing key; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: is a {type(key).__name__}, expected an Ed25519 private key")
    return key


def _public(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """SubjectPublicKeyInfo PEM of a key (private keys give their public half)."""
    return _public(key).public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def load_public_key(pem_or_path: str | bytes | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text/bytes or from a file holding it."""
    if isinstance(pem_or_path, Ed25519PublicKey):
        return pem_or_path
    source = "public key"
    if isinstance(pem_or_path, Path) or (isinstance(pem_or_path, str) and "-----BEGIN" not in pem_or_path):
        path = Path(pem_or_path)
        source = str(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"{path}: cannot read public key ({exc.strerror})") from exc
    else:
        data = pem_or_path.encode("ascii") if isinstance(pem_or_path, str) else pem_or_path
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{source}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{source}: is a {type(key).__name__}, expected an Ed25519 public key")
    return key


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Short stable name of a public key (sha256 of its raw 32 bytes, first 16 hex) for messages."""
    raw = _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_hash(key: Ed25519PrivateKey, entry_hash: str) -> str:
    return base64.b64encode(key.sign(entry_hash.encode("ascii"))).decode("ascii")


def verify_hash_signature(public_key: Ed25519PublicKey, entry_hash: str, signature_b64: str) -> bool:
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public_key.verify(signature, entry_hash.encode("ascii"))
    except (InvalidSignature, ValueError, TypeError, UnicodeEncodeError):
        return False
    return True
