"""Pod Security Admission labels for the namespaces the stack creates.

Each namespace gets the strictest Pod Security Standard its pods meet, enforced (the API server
refuses pods that break it), warned about (kubectl shows it) and audited, all pinned to one
standard version so a cluster upgrade cannot silently change what "restricted" means.
"""

from __future__ import annotations

from typing import Literal

from components.pins import POD_SECURITY_ADMISSION_VERSION

PodSecurityLevel = Literal["privileged", "baseline", "restricted"]

POD_SECURITY_VERSION = "v1." + POD_SECURITY_ADMISSION_VERSION.split(".")[1]
"""Version of the Pod Security Standards the labels pin (a Kubernetes minor version); clusters
older than it evaluate their own newest version."""

MODES = ("enforce", "warn", "audit")


def pod_security_labels(level: PodSecurityLevel, version: str = POD_SECURITY_VERSION,
                        enforce: PodSecurityLevel | None = None) -> dict[str, str]:
    """`pod-security.kubernetes.io/<mode>` and `<mode>-version` for enforce, warn and audit;
    `enforce` lowers what is enforced while warnings and audit stay at `level` (a namespace that
    must admit one pod that meets only baseline)."""
    labels: dict[str, str] = {}
    for mode in MODES:
        labels[f"pod-security.kubernetes.io/{mode}"] = level
        labels[f"pod-security.kubernetes.io/{mode}-version"] = version
    if enforce is not None:
        labels["pod-security.kubernetes.io/enforce"] = enforce
    return labels
