"""Credentials for a deployed federation: the coordinator's CA, the SuperLink's TLS certificate,
each node's SuperNode authentication key, and each school's ledger signing key.

Everything is made with the `cryptography` package:
- CA and SuperLink certificate: EC P-384, SHA-384 signatures. The SuperLink certificate carries a
  SAN for every host name and address the schools will dial, plus localhost / 127.0.0.1 / ::1 so
  the coordinator can reach its own SuperLink (the Flower CLI talks to the same port).
- SuperNode authentication key: ECDSA P-384 in OpenSSH format, the format Flower 1.41's
  `flwr supernode register` and `flower-supernode --auth-supernode-private-key` read
  (`load_ssh_private_key` / `ecdsa-sha2-nistp384 ...`).
- Ledger signing key: Ed25519, owned by `privacy.signing` (the ClientApp signs every ledger entry
  with it); the coordinator only keeps the public half in its keyring.

Private keys are written 0600 through shared_models/atomic_files.py, whose temp file is created 0600 —
never world-readable first and chmod-ed afterwards — and atomically (temp file, fsync, rename, fsync of the
folder), so a crash leaves no half key and no key that vanishes with the folder's unsynced entry.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import base64
import ipaddress
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_models.atomic_files import atomic_write_bytes
from shared_models.small_files import SmallFileError, read_small_file

# Names every SuperLink certificate carries so the coordinator reaches its own SuperLink.
LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
NODE_KEY_TYPE = "ecdsa-sha2-nistp384"
NODE_KEY_FILE = "supernode"            # the SuperNode key's file name (its public half: supernode.pub)
CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 825
_HOSTNAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class CredentialError(ValueError):
    """A credential file is missing, malformed, of the wrong type, or too widely readable."""


# ------------------------------------------------------------------------------------ file writing
def write_private(path: Path, data: bytes) -> None:
    """Write a secret (0600, atomic, durable: shared_models/atomic_files.py). The file is never readable by
    others, not even briefly: its temp file is created 0600."""
    atomic_write_bytes(path, data, mode=0o600)


def write_public(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a non-secret file (certificate, public key, script) atomically."""
    atomic_write_bytes(path, data, mode)


def private_file_problem(path: Path) -> str | None:
    """Why `path` is not a safe private key file (None when it is: a regular file, mode 0600/0400)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path}: missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file"
    if st.st_mode & 0o077:
        return f"{path}: readable by group/others (mode {stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}"
    return None


# ------------------------------------------------------------------------------------ names / SANs
def classify_name(name: str) -> x509.GeneralName:
    """A SAN entry for a host name or an IP address; a clear error for anything else."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.match(text) or text.replace(".", "").isdigit():
        raise CredentialError(f"certificate name {name!r} is neither a host name nor an IP address")
    return x509.DNSName(text.lower())


def san_names(names: Iterable[str], include_loopback: bool = True) -> list[str]:
    """The SAN list: given names (validated, deduplicated, order kept) + loopback names."""
    result: list[str] = []
    seen: set[str] = set()
    for name in [*names, *(LOOPBACK_NAMES if include_loopback else ())]:
        entry = classify_name(name)
        key = str(entry.value)
        if key not in seen:
            seen.add(key)
            result.append(key)
    return result


def certificate_sans(cert: x509.Certificate) -> list[str]:
    """Host names and addresses a certificate is valid for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


# ------------------------------------------------------------------------------------ CA + server cert
MAX_COMMON_NAME = 64   # RFC 5280 ub-common-name; a longer host name lives in the SAN only


def common_name_for(text: str, fallback: str) -> str:
    """`text` as a certificate CN, or `fallback` when it is too long (TLS clients check the SAN, not the CN)."""
    return text if 0 < len(text) <= MAX_COMMON_NAME else fallback


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def create_ca(common_name: str = "fedfer coordinator CA", valid_days: int = CA_VALID_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (EC P-384) that may only sign end-entity certificates (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name_for(common_name, "fedfer CA")),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfer")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    valid_days: int = SERVER_VALID_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate: SANs for `names` (+ loopback), serverAuth, signed by the CA."""
    sans = san_names(names)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name_for(sans[0], "fedfer SuperLink")),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfer")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(min(now + _dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([classify_name(n) for n in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise CredentialError unless `cert` is signed by `ca_cert` and currently valid."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no message
        raise CredentialError(f"certificate '{cert.subject.rfc4514_string()}' is not signed by the CA: {exc!r}") from exc
    now = _now()
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise CredentialError(f"certificate '{cert.subject.rfc4514_string()}' is not valid now "
                              f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})")


def pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_certificate(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


#: Largest certificate or key file read: a PEM certificate is a few kilobytes. Bounded, and a named pipe is
#: refused rather than waited on (a ca.crt that was a pipe hung `fedfer deploy add-school`).
MAX_CREDENTIAL_BYTES = 1024 * 1024


def _read_credential(path: Path, what: str) -> bytes:
    try:
        return read_small_file(path, MAX_CREDENTIAL_BYTES)
    except SmallFileError as exc:
        if exc.why == "missing":
            raise CredentialError(f"{path}: {what} file missing") from None
        raise CredentialError(f"{path}: cannot read the {what} ({exc.why})") from None


def load_certificate(path: Path) -> x509.Certificate:
    data = _read_credential(Path(path), "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise CredentialError(f"{path}: not a PEM certificate ({' '.join(str(exc).split())})") from None


def load_ec_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    data = _read_credential(Path(path), "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CredentialError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


# ------------------------------------------------------------------------------------ node auth keys
@dataclass(frozen=True)
class NodeKey:
    """A SuperNode authentication key pair on disk."""

    private_path: Path
    public_path: Path
    public_openssh: str      # "ecdsa-sha2-nistp384 AAAA... comment"
    fingerprint: str         # "SHA256:..." as `ssh-keygen -lf` prints it


def openssh_fingerprint(public_openssh: str) -> str:
    """The SHA-256 fingerprint `ssh-keygen -l` shows, so an admin can compare keys by eye."""
    parts = public_openssh.split()
    if len(parts) < 2:
        raise CredentialError(f"not an OpenSSH public key: {public_openssh[:40]!r}")
    digest = hashlib.sha256(base64.b64decode(parts[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def create_node_key(directory: Path, stem: str = "supernode", comment: str = "") -> NodeKey:
    """Generate an ECDSA P-384 SuperNode key pair in OpenSSH format: `<stem>` (0600) + `<stem>.pub`."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    if comment:
        public = f"{public} {comment}"
    directory = Path(directory)
    private_path, public_path = directory / stem, directory / f"{stem}.pub"
    write_private(private_path, private)
    write_public(public_path, (public + "\n").encode())
    return NodeKey(private_path, public_path, public, openssh_fingerprint(public))


def load_node_public_key(path: Path) -> str:
    """Read and check a SuperNode public key (`ecdsa-sha2-nistp384 ...`); returns the one-line key."""
    path = Path(path)
    data = _read_credential(path, "public key")
    try:
        text = data[:16384].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CredentialError(f"{path}: cannot read as text ({exc})") from None
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:   # a PEM key arrives as "Unsupported key type"
        raise CredentialError(f"{path}: not an OpenSSH public key ({' '.join(str(exc).split())[:80]})") from None
    if not (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"):
        raise CredentialError(f"{path}: Flower SuperNode keys must be {NODE_KEY_TYPE} (ECDSA P-384), "
                              f"got {text.split()[0]}")
    return text


def load_node_key(private_path: Path) -> NodeKey:
    """Open an existing SuperNode private key (checking its permissions) and derive the public half."""
    private_path = Path(private_path)
    if problem := private_file_problem(private_path):
        raise CredentialError(problem)
    try:
        key = serialization.load_ssh_private_key(_read_credential(private_path, "private key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CredentialError(f"{private_path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"):
        raise CredentialError(f"{private_path}: SuperNode keys must be ECDSA P-384")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return NodeKey(private_path, private_path.with_name(private_path.name + ".pub"), public, openssh_fingerprint(public))


# ------------------------------------------------------------------------------------ ledger key
def ledger_public_key_pem(state_dir: Path) -> str:
    """The school's ledger verification key (PEM), creating the Ed25519 signing key if needed.

    `privacy.signing` owns the key file (its name and format): the ClientApp signs with exactly the
    key it loads, so the coordinator's keyring copy must come from the same function.
    """
    try:
        from privacy.signing import load_or_create_signing_key, public_key_pem
    except ModuleNotFoundError as exc:
        if exc.name != "privacy.signing":
            raise
        raise CredentialError("privacy/signing.py is not available; cannot create the school's ledger key") from None
    return public_key_pem(load_or_create_signing_key(Path(state_dir)))
