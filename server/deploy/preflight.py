"""Check the coordinator's SuperLink files before it starts: one line naming the missing or unusable path, exit 2.

Why: Flower's own message for a missing file names the option, not the path ("Path argument
`--ssl-certfile` does not point to a file."). The coordinator's start script (`start-superlink.sh`, written
by `fedfer deploy init`) runs this first; `fedfer deploy up` (server/deploy/local.py) calls `check_superlink`.

Usage: python -m server.deploy.preflight -- <flower-superlink arguments>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

from shared_models.start_files import option, read_start_file, run_start_check


FILES = {   # option -> what the file is (Flower reads each at start)
    "--ssl-ca-certfile": "the federation's CA certificate",
    "--ssl-certfile": "the SuperLink's TLS certificate",
    "--ssl-keyfile": "the SuperLink's TLS private key",
}
WRITTEN = {"--database": "the SuperLink's database", "--log-file": "the SuperLink's log file"}


class SuperLinkStartError(ValueError):
    """Why the SuperLink cannot start, as one line naming the path."""


def check_superlink(args: Sequence[str]) -> None:
    """Every file `flower-superlink <args>` reads at start exists and is what it should be; the folders of
    the files it writes exist and are writable. Raises SuperLinkStartError for the first problem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    for name, what in FILES.items():
        value = option(args, name)
        if value is None:
            continue
        path = Path(value).expanduser()
        data = read_start_file(path, what, SuperLinkStartError)
        try:
            if name == "--ssl-keyfile":
                serialization.load_pem_private_key(data, password=None)
            else:
                x509.load_pem_x509_certificates(data)
        except (ValueError, TypeError):
            kind = "an unencrypted PEM private key" if name == "--ssl-keyfile" else "a PEM certificate"
            raise SuperLinkStartError(f"{path}: not {kind} ({what})") from None
    for name, what in WRITTEN.items():
        value = option(args, name)
        if value is None or value.startswith((":", "sqlite:")):   # Flower's in-memory databases
            continue
        folder = Path(value).expanduser().parent
        if not folder.is_dir():
            raise SuperLinkStartError(f"{folder}: no such directory (for {what} {value})")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise SuperLinkStartError(f"{folder}: not writable by this user (for {what} {value})")


def main(argv: Sequence[str] | None = None) -> int:
    return run_start_check(check_superlink, SuperLinkStartError, argv)


if __name__ == "__main__":
    sys.exit(main())
