"""TLS for the ingress: the `ingress.certManager` section, cert-manager (installed with Helm on
request, like KEDA), the ACME HTTP-01 ClusterIssuer the stack can create, and what the Ingress
needs to use them.

How a certificate is obtained through the F5 NGINX Ingress Controller, with no window in which
`pulumi up` undoes an issuance: the stack creates the Certificate itself (not cert-manager's
ingress-shim) and cert-manager never edits an object Pulumi manages. The controller gives each
host to ONE Ingress ("host ... is taken by another resource"), except for mergeable Ingresses:
a `master` holds the host and its TLS, `minion`s add paths to it. So the stack's Ingress is a
master (host, TLS, the HTTPS redirect) and a minion (/v1 and the balancing annotations), and
the ACME solver's own Ingress, which cert-manager creates and deletes, is one more minion: the
ClusterIssuer's `ingressTemplate` marks it so. (`http01-edit-in-place`, used before, makes
cert-manager add the challenge path to our Ingress with an Update: a `pulumi up` during the
issuance applied our rules over it and took the path away.) The controller redirects every
plain-HTTP request to HTTPS once the host has TLS (`nginx.org/ssl-redirect`), and without a
certificate in the Secret it would reject the TLS handshake; ACME's HTTP-01 validation follows
the redirect and does not check the certificate it meets, so the Certificate asks for a
temporary self-signed one first (`cert-manager.io/issue-temporary-certificate`). Upstream facts:
tests/contracts/data/cert-manager-v1.21.1.json and nginx-ingress-controller-5.5.4.json
(`mergeableIngresses`).
"""

from __future__ import annotations

from typing import Any

from components.config.sections import Section
from components.config.types import DnsLabel, NonEmptyStr
from components.pins import CERT_MANAGER_VERSION

LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"

TEMPORARY_CERTIFICATE_ANNOTATION = "cert-manager.io/issue-temporary-certificate"
"""On a Certificate: a self-signed certificate fills the Secret while the issuer works."""
MERGEABLE_ANNOTATION = "nginx.org/mergeable-ingress-type"
"""The controller's master/minion Ingresses: minions add paths to their master's host."""


class CertManagerConfig(Section):
    enabled: bool = False
    """Get the certificate for `ingress.host` from cert-manager (needs `ingress.host`)."""
    install: bool = False
    """Install cert-manager with Helm into `namespace`; false expects it installed."""
    namespace: DnsLabel = "cert-manager"
    """Namespace cert-manager is installed into."""
    chart_version: NonEmptyStr = CERT_MANAGER_VERSION
    """Version of the jetstack cert-manager chart (only the pinned one was checked)."""
    cluster_issuer: DnsLabel | None = None
    """An existing ClusterIssuer to use; unset creates an ACME (Let's Encrypt) one that solves
    HTTP-01 through this stack's controller. An existing HTTP-01 issuer's solver must carry
    ingressTemplate.metadata.annotations nginx.org/mergeable-ingress-type: minion to join the
    host."""
    acme_email: NonEmptyStr | None = None
    """Contact address of the ACME account the stack creates (optional for Let's Encrypt)."""
    acme_server: NonEmptyStr = LETSENCRYPT_PRODUCTION
    """ACME directory, e.g. Let's Encrypt's staging one while testing."""


def tls_secret_name(class_name: str) -> str:
    """Secret cert-manager writes the certificate into (in the model's namespace)."""
    return f"{class_name}-tls"


def issuer_name(class_name: str, cfg: CertManagerConfig) -> str:
    return cfg.cluster_issuer if cfg.cluster_issuer is not None else f"{class_name}-acme"


def certificate(host: str, class_name: str, cfg: CertManagerConfig) -> dict[str, Any]:
    """The Certificate the stack creates for `host` (metadata annotations and spec): the Secret
    the Ingress names, from the issuer, with a temporary certificate while it is issued."""
    return {
        "annotations": {TEMPORARY_CERTIFICATE_ANNOTATION: "true"},
        "spec": {
            "secretName": tls_secret_name(class_name),
            "dnsNames": [host],
            "issuerRef": {"name": issuer_name(class_name, cfg), "kind": "ClusterIssuer",
                          "group": "cert-manager.io"},
        },
    }


def mergeable_annotations(role: str) -> dict[str, str]:
    """`master` (host and TLS) or `minion` (paths), see the module docstring."""
    if role not in ("master", "minion"):
        raise ValueError(f"mergeable_annotations: 'role' must be 'master' or 'minion', not {role!r}")
    return {MERGEABLE_ANNOTATION: role}


def cert_manager_values() -> dict[str, Any]:
    """Helm values: the chart installs the CRDs too (off by default). Its pods already meet the
    restricted Pod Security Standard by default (facts file)."""
    return {"crds": {"enabled": True}}


def acme_issuer_spec(cfg: CertManagerConfig, class_name: str) -> dict[str, Any]:
    acme: dict[str, Any] = {
        "server": cfg.acme_server,
        "privateKeySecretRef": {"name": f"{issuer_name(class_name, cfg)}-account"},
        # The solver's own Ingress joins our host as a minion (see the module docstring).
        "solvers": [{"http01": {"ingress": {
            "ingressClassName": class_name,
            "ingressTemplate": {"metadata": {"annotations": mergeable_annotations("minion")}},
        }}}],
    }
    if cfg.acme_email is not None:
        acme["email"] = cfg.acme_email
    return {"acme": acme}
