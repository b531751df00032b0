"""A self-signed certificate for local mode's nginx (`python -m local up --tls`).

Made with the `openssl` command line, for `localhost` and 127.0.0.1, valid 30 days; the key
is readable by its owner only. Clients trust exactly this certificate
(`verify=ssl.create_default_context(cafile=<cert>)`), nothing else changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from local.procs import LocalModeError

CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"


def self_signed(directory: Path, days: int = 30) -> tuple[Path, Path]:
    """Write `tls.crt` and `tls.key` into ``directory``; return their paths."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise LocalModeError("--tls needs the openssl command (apt-get install openssl)")
    cert, key = directory / CERT_NAME, directory / KEY_NAME
    result = subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise LocalModeError(f"openssl could not make a certificate: {result.stderr.strip()}")
    os.chmod(key, 0o600)
    return cert, key
