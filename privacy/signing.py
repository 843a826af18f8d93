"""A school's Ed25519 ledger-signing key (not its TLS/node credentials — those are credentials.py).

The private key never leaves the school's state directory (``signing_key.pem``, PKCS#8, mode 0600);
the public key (``signing_key.pub``, SubjectPublicKeyInfo PEM) is what the server and auditors hold.
Signatures are over the ASCII hex of a ledger entry's sha256 hash, base64-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.state_folder import LedgerLostError, check_ledger_not_lost
from shared_models.atomic_files import atomic_write_bytes, fsync_dir
from shared_models.small_files import SmallFileError, read_small_file

SIGNING_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub"
NEW_SIGNING_KEY_FILE = "signing_key.new.pem"   # during a key rotation only
#: the staged key's public half, written before the staged key replaces signing_key.pem and moved onto
#: signing_key.pub after: what tells a crash between the two swaps apart (install_new_signing_key)
NEW_PUBLIC_KEY_FILE = "signing_key.new.pub"
#: Largest key file read. An Ed25519 PEM is about 120 bytes; anything near this is not a key, and a
#: bound keeps a file planted in a keyring or retired-key folder (a symlink to /dev/zero) from filling memory.
MAX_KEY_FILE_BYTES = 64 * 1024

# privacy/ imports no Flower: a plain logger (the ServerApp's and ClientApp's handlers, or Python's last-resort
# handler on stderr in a command, show its warnings)
log = logging.getLogger(__name__)


class SigningKeyError(ValueError):
    """A key file is missing, unreadable, of the wrong type or too widely readable."""


def load_or_create_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """The school's signing key from ``<state_dir>/signing_key.pem``; created (0600) on first use, with its
    public half ``signing_key.pub`` (written again from the private key if it is missing, or if a crash during
    :func:`install_new_signing_key` left it naming the replaced key: :func:`_match_public_to`).

    Creation writes the key to a temporary file first and links it into place, so a crash never leaves a
    partial key file and two processes starting at once cannot each make a different key: the loser reads
    the winner's file. A key file readable by group or others is refused, as ssh does.
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / SIGNING_KEY_FILE
    _replace_empty_unused_key(path)
    if not path.exists() and _has_ledger(state_dir):
        # a new key here could not open the ledger (its chain is under the old key), and writing its public half
        # would overwrite signing_key.pub, the lost key's public half that a key recovery names
        raise SigningKeyError(f"{path}: missing, but the ledger beside it was signed with it: restore the key from "
                              f"a backup, or if it is lost run `fedfer deploy school-key --state-dir {state_dir} "
                              f"--recover-ledger-key`")
    if not path.exists():
        try:   # key and ledger both gone from a folder that shows earlier rounds: a new key would start at ε 0
            check_ledger_not_lost(state_dir)
        except LedgerLostError as exc:
            raise SigningKeyError(str(exc)) from None
        key = Ed25519PrivateKey.generate()
        pem = _private_pem(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{SIGNING_KEY_FILE}.", suffix=".tmp", dir=state_dir)   # 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)   # fails if another process made the key first: fall through and load theirs
        except FileExistsError:
            pass
        else:
            fsync_dir(state_dir)
            _write_public(state_dir / PUBLIC_KEY_FILE, key)
            return key
        finally:
            Path(tmp).unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningKeyError(f"{path}: permissions {oct(mode)} let others read the signing key; chmod 600 it")
    if path.stat().st_size == 0:
        raise SigningKeyError(f"{path}: empty, and the school's ledger beside it was signed with the key it held; "
                              "restore the key from a backup")
    key = _read_private_key(path, "not an unencrypted PEM private key ({exc})")
    _match_public_to(state_dir, key)
    return key


def _match_public_to(state_dir: Path, key: Ed25519PrivateKey) -> None:
    """Make ``signing_key.pub`` the public half of `key` (the private key in force) where a crash left it
    otherwise, and only there: a ``.pub`` naming another key is rewritten only when that key is known to be
    replaced — the interrupted install's ``signing_key.new.pub`` names `key`, or the ``.pub``'s key is one this
    school retired (an install by an older fedfer, which kept no ``signing_key.new.pub``). Any other mismatch
    (e.g. a private key restored from a backup older than a rotation) is left for the admin to see: the
    ``.pub`` may be the only copy of a key the ledger names. With the private key missing nothing here runs,
    so a ``.pub`` naming a lost key stays for ``--recover-ledger-key``."""
    public, pending = state_dir / PUBLIC_KEY_FILE, state_dir / NEW_PUBLIC_KEY_FILE
    if pending.is_file() and _holds_key(pending, key):
        # install_new_signing_key swapped the private key in and stopped before moving its public half
        os.replace(pending, public)
        fsync_dir(state_dir)
        log.warning("%s: finished an interrupted key install: %s is now the public half of key %s",
                    state_dir, PUBLIC_KEY_FILE, key_id(key))
        return
    if not public.exists():   # a crash between the two files, or an older fedfer: the public half again
        _write_public(public, key)
        return
    if _holds_key(public, key) or not public.is_file():
        return
    try:
        named = key_id(load_public_key(public))
    except SigningKeyError:   # unreadable: not a key this school handed over, so not ours to replace
        return
    if any(key_id(retired) == named for retired in _retired_keys_readable(public)):
        _write_public(public, key)
        log.warning("%s: %s named key %s, which this school retired; rewritten as the public half of key %s, the "
                    "signing key in force", state_dir, PUBLIC_KEY_FILE, named, key_id(key))


def _holds_key(public_file: Path, key: Ed25519PrivateKey) -> bool:
    """Whether `public_file` holds `key`'s public half (False if it is unreadable or another key)."""
    try:
        return key_id(load_public_key(public_file)) == key_id(key)
    except SigningKeyError:
        return False


def _retired_keys_readable(public_file: Path) -> list[Ed25519PublicKey]:
    """The retired keys beside `public_file`; a damaged one is skipped here (the verifiers report it)."""
    keys = []
    for path in sorted(retired_dir(public_file).glob("*.pub")):
        try:
            keys.append(load_public_key(path))
        except SigningKeyError:
            continue
    return keys


def stage_new_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """The school's next signing key, ``signing_key.new.pem`` (0600) beside the current one until the key
    transition to it is in the ledger (:func:`install_new_signing_key`). A key left there by an interrupted
    rotation is used again: the ledger may already name it."""
    path = Path(state_dir) / NEW_SIGNING_KEY_FILE
    if path.exists():
        return _read_private_key(path, "left by an interrupted rotation and unreadable ({exc}); if the ledger "
                                       "does not name it, delete it and rotate again")
    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(path, _private_pem(key), mode=0o600)
    return key


def install_new_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """Make the staged key the school's signing key. The old private key is overwritten, not kept: the
    ledger's key transition carries its public half, so nothing needs it again, and a kept copy is what
    could sign a fork of the ledger wherever a keyring still trusts the old key.

    The pair changes in three steps, so that a crash at any point leaves a state the next load completes:
    the staged key's public half is written as ``signing_key.new.pub``; the staged key replaces
    ``signing_key.pem``; ``signing_key.new.pub`` replaces ``signing_key.pub``. A crash before the second
    step leaves the old pair (a rotation run again finishes it); after it, ``signing_key.pub`` still names the
    old key beside the new private key, and ``signing_key.new.pub`` says which one is in force:
    :func:`load_or_create_signing_key` then moves it into place."""
    state_dir = Path(state_dir)
    key = stage_new_signing_key(state_dir)
    _write_public(state_dir / NEW_PUBLIC_KEY_FILE, key)
    os.replace(state_dir / NEW_SIGNING_KEY_FILE, state_dir / SIGNING_KEY_FILE)
    fsync_dir(state_dir)
    os.replace(state_dir / NEW_PUBLIC_KEY_FILE, state_dir / PUBLIC_KEY_FILE)
    fsync_dir(state_dir)
    return key


def _has_ledger(state_dir: Path) -> bool:
    """Whether the school's ledger (privacy/ledger.py LEDGER_FILE) holds anything a key signed."""
    try:
        return (state_dir / "ledger.jsonl").stat().st_size > 0
    except FileNotFoundError:
        return False


def _replace_empty_unused_key(path: Path) -> None:
    """An older fedfer created the key file empty and filled it afterwards; a crash in between left it
    empty. With no ledger beside it nothing was ever signed with that key: remove it so a new one is made."""
    try:
        empty = path.stat().st_size == 0
    except FileNotFoundError:
        return
    if empty and not (path.parent / "ledger.jsonl").exists():   # privacy/ledger.py LEDGER_FILE
        path.unlink(missing_ok=True)
        (path.parent / PUBLIC_KEY_FILE).unlink(missing_ok=True)


def _write_public(path: Path, key: Ed25519PrivateKey) -> None:
    atomic_write_bytes(path, public_key_pem(key).encode("ascii"), mode=0o644)   # the public half: readable


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read_private_key(path: Path, unreadable: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in `path`; `unreadable` (with ``{exc}``) says what a file that does not parse means."""
    try:
        data = read_small_file(path, MAX_KEY_FILE_BYTES)
    except SmallFileError as exc:
        raise SigningKeyError(str(exc)) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:   # UnsupportedAlgorithm: a key type of no use here
        raise SigningKeyError(f"{path}: " + unreadable.format(exc=exc)) from exc
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
            data = read_small_file(path, MAX_KEY_FILE_BYTES)
        except SmallFileError as exc:
            raise SigningKeyError(f"{path}: cannot read public key ({exc.why})") from None
    else:
        data = pem_or_path.encode("ascii") if isinstance(pem_or_path, str) else pem_or_path
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:   # UnsupportedAlgorithm: an unknown key type
        raise SigningKeyError(f"{source}: not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{source}: is a {type(key).__name__}, expected an Ed25519 public key")
    return key


def retired_dir(public_key_file: Path) -> Path:
    """Where the keys a public key file replaced are kept: ``<name>.pub`` -> ``<name>.retired/``, one
    ``<key id>.pub`` each (a keyring's ``<school>.retired/``, a run's ``keys/<school>.retired/``, a school's
    ``signing_key.retired/``). A verifier trusts them only as the key a chain starts under."""
    path = Path(public_key_file)
    return path.with_name(path.stem + ".retired")


def retire_public_key(public_key_file: Path, key: Ed25519PrivateKey | Ed25519PublicKey) -> Path:
    """Keep `key` (its public half) as a retired key of `public_key_file`; idempotent."""
    return _keep_public_key(retired_dir(public_key_file), key)


def retired_public_keys(public_key_file: Path) -> list[Ed25519PublicKey]:
    """The retired keys kept beside `public_key_file` (none if there are none)."""
    return _kept_public_keys(retired_dir(public_key_file))


#: Permissions of a public key file fedfer writes (a run's pinned key of a school, its retired and recovery keys):
#: readable by all, like the keyring's (server/deploy/credentials.py write_public). It is no secret, and a privacy
#: officer auditing a run with --trust-run-keys may do so under another account than the coordinator's.
PUBLIC_KEY_MODE = 0o644


def write_public_key(path: Path, key: Ed25519PrivateKey | Ed25519PublicKey | str) -> None:
    """The one writer of a public key file beside a ledger or in a run (``keys/<school>.pub`` and the keys kept
    beside it): `key`'s public half as PEM, replaced all at once (a crash leaves the old key or the new one,
    never a torn file that stops every later resume or audit), mode PUBLIC_KEY_MODE."""
    pem = key if isinstance(key, str) else public_key_pem(key)
    atomic_write_bytes(path, pem.encode("ascii"), mode=PUBLIC_KEY_MODE)


def _keep_public_key(folder: Path, key: Ed25519PrivateKey | Ed25519PublicKey) -> Path:
    """``<folder>/<key id>.pub`` holding `key`'s public half (written once)."""
    path = folder / f"{key_id(key)}.pub"
    if not path.is_file():
        write_public_key(path, key)
    return path


def _kept_public_keys(folder: Path) -> list[Ed25519PublicKey]:
    return [load_public_key(p) for p in sorted(folder.glob("*.pub"))]


def trusted_public_keys(public_key_file: Path) -> list[Ed25519PublicKey]:
    """The key in `public_key_file` (current: first) and the retired keys kept beside it."""
    return [load_public_key(Path(public_key_file))] + retired_public_keys(public_key_file)


def recovery_dir(public_key_file: Path) -> Path:
    """Where the keys an admin approved as *recovery* keys are kept: ``<name>.pub`` -> ``<name>.recovered/``, one
    ``<key id>.pub`` each. A key recovery (privacy/ledger.py) is signed by the new key alone, for a lost key that
    cannot sign a hand-over, so a verifier accepts one only from a key listed here: trusting a key as the school's
    current one (a plain rotation) does not let it take over a chain on its own word."""
    path = Path(public_key_file)
    return path.with_name(path.stem + ".recovered")


def approve_recovery_key(public_key_file: Path, key: Ed25519PrivateKey | Ed25519PublicKey) -> Path:
    """Keep `key` (its public half) as an approved recovery key of `public_key_file`; idempotent."""
    return _keep_public_key(recovery_dir(public_key_file), key)


def recovery_public_keys(public_key_file: Path) -> list[Ed25519PublicKey]:
    """The approved recovery keys kept beside `public_key_file` (none if there are none)."""
    return _kept_public_keys(recovery_dir(public_key_file))


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
