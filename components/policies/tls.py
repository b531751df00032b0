"""TLS for the ingress: the `ingress.certManager` section, cert-manager (installed with Helm on
request, like KEDA), the ACME HTTP-01 ClusterIssuer the stack can create, and what the Ingress
needs to use them.

How a certificate is obtained through the F5 NGINX Ingress Controller: the Ingress names the
issuer (`cert-manager.io/cluster-issuer`) and a TLS Secret; cert-manager's ingress-shim creates
the Certificate. The controller gives each host to ONE Ingress ("host ... is taken by another
resource"), so the ACME solver cannot bring its own Ingress: `http01-edit-in-place` makes
cert-manager add the challenge path to ours, and also makes it put a temporary self-signed
certificate into the Secret first. That matters: the controller redirects every plain-HTTP
request to HTTPS once the Ingress has TLS (`nginx.org/ssl-redirect`), and without a certificate
in the Secret it would reject the TLS handshake; ACME's HTTP-01 validation follows the redirect
and does not check the certificate it meets on the way. Upstream facts:
tests/contracts/data/cert-manager-v1.21.1.json.
"""

from __future__ import annotations

from typing import Any

from components.config.sections import Section
from components.config.types import DnsLabel, NonEmptyStr
from components.pins import CERT_MANAGER_VERSION

LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"

CLUSTER_ISSUER_ANNOTATION = "cert-manager.io/cluster-issuer"
EDIT_IN_PLACE_ANNOTATION = "acme.cert-manager.io/http01-edit-in-place"


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
    HTTP-01 through this stack's controller."""
    acme_email: NonEmptyStr | None = None
    """Contact address of the ACME account the stack creates (optional for Let's Encrypt)."""
    acme_server: NonEmptyStr = LETSENCRYPT_PRODUCTION
    """ACME directory, e.g. Let's Encrypt's staging one while testing."""


def tls_secret_name(class_name: str) -> str:
    """Secret cert-manager writes the certificate into (in the model's namespace)."""
    return f"{class_name}-tls"


def issuer_name(class_name: str, cfg: CertManagerConfig) -> str:
    return cfg.cluster_issuer if cfg.cluster_issuer is not None else f"{class_name}-acme"


def ingress_tls_annotations(class_name: str, cfg: CertManagerConfig) -> dict[str, str]:
    """The cert-manager annotations of the Ingress (not controller annotations)."""
    annotations = {CLUSTER_ISSUER_ANNOTATION: issuer_name(class_name, cfg)}
    if cfg.cluster_issuer is None:
        # Our own HTTP-01 issuer: the challenge path must go into our Ingress (see above).
        annotations[EDIT_IN_PLACE_ANNOTATION] = "true"
    return annotations


def cert_manager_values() -> dict[str, Any]:
    """Helm values: the chart installs the CRDs too (off by default). Its pods already meet the
    restricted Pod Security Standard by default (facts file)."""
    return {"crds": {"enabled": True}}


def acme_issuer_spec(cfg: CertManagerConfig, class_name: str) -> dict[str, Any]:
    acme: dict[str, Any] = {
        "server": cfg.acme_server,
        "privateKeySecretRef": {"name": f"{issuer_name(class_name, cfg)}-account"},
        "solvers": [{"http01": {"ingress": {"ingressClassName": class_name}}}],
    }
    if cfg.acme_email is not None:
        acme["email"] = cfg.acme_email
    return {"acme": acme}
