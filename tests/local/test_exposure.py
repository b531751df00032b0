"""What local mode's nginx publishes, and as whom it runs: real replicas, real nginx."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx

from local import LocalCluster
from local.privileges import unprivileged_account

Make = Callable[..., LocalCluster]


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])  # real uid
    raise AssertionError(f"no Uid line for {pid}")


def _workers(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


def test_only_the_api_and_nginx_health_are_published(make_cluster: Make) -> None:
    cluster = make_cluster(1)
    root = f"http://127.0.0.1:{cluster.port}"
    key = {"Authorization": f"Bearer {cluster.api_key}"}
    assert httpx.get(cluster.endpoint + "/models", headers=key).status_code == 200
    assert httpx.get(root + "/nginx-health").status_code == 200
    # The replica answers these directly, but nginx never passes them on.
    replica = cluster.replica_urls[0]
    # (`/v1` alone is redirected to `/v1/` by nginx, which publishes nothing more.)
    for path in ("/metrics", "/health", "/ready", "/tokenize", "/invocations", "/",
                 "/v2/models", "/metricsv1/"):
        resp = httpx.request("POST" if path in ("/tokenize", "/invocations") else "GET",
                             root + path, headers=key)
        assert resp.status_code == 404, path
        assert resp.json()["error"]["code"] == "not_found", path
    assert httpx.get(replica + "/metrics").status_code == 200


def test_nginx_workers_never_run_as_root(make_cluster: Make) -> None:
    cluster = make_cluster(1)
    assert cluster.nginx_pid is not None
    workers = _workers(cluster.nginx_pid)
    assert workers
    expected = os.geteuid()
    if expected == 0:
        account = unprivileged_account()
        assert account is not None  # www-data or nobody exist on every CI image
        expected = account.uid
    assert {_uid(pid) for pid in workers} == {expected}
    assert "user root" not in (cluster.workdir / "nginx" / "nginx.conf").read_text()
    # A body bigger than nginx's in-memory buffer goes through a temp file the workers write.
    big = "x" * 200_000
    resp = httpx.post(cluster.endpoint + "/completions", timeout=10,
                      headers={"Authorization": f"Bearer {cluster.api_key}"},
                      json={"model": cluster.model_name, "prompt": big[:50] + " " + big,
                            "max_tokens": 2})
    assert resp.status_code in (200, 400), resp.text  # 400: longer than the context
    assert resp.json().get("error", {}).get("code") in (None, "context_length_exceeded")


def test_tls_serves_https_only_with_its_self_signed_certificate(make_cluster: Make) -> None:
    import openai

    from local.__main__ import banner

    cluster = make_cluster(1, tls=True)
    assert cluster.endpoint.startswith("https://127.0.0.1:")
    cert = cluster.tls_certificate
    assert cert is not None and cert.exists()
    key = cert.with_name("tls.key")
    assert key.stat().st_mode & 0o077 == 0  # the key is the owner's alone
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as trusting:
        client = openai.OpenAI(base_url=cluster.endpoint, api_key=cluster.api_key,
                               http_client=trusting, max_retries=0)
        assert [m.id for m in client.models.list().data] == [cluster.model_name]
    # Nothing answers in plain text, and a client that does not trust the certificate stops.
    plain = cluster.endpoint.replace("https://", "http://") + "/models"
    resp = httpx.get(plain, headers={"Authorization": f"Bearer {cluster.api_key}"})
    assert resp.status_code == 400 and "HTTPS" in resp.text  # nginx: plain HTTP to an SSL port
    try:
        httpx.get(cluster.endpoint + "/models")
        raise AssertionError("an untrusted certificate was accepted")
    except httpx.ConnectError as exc:
        assert "CERTIFICATE_VERIFY_FAILED" in str(exc)
    text = banner(cluster)
    assert f"--cacert {cert}" in text
    assert f"httpx.Client(verify=ssl.create_default_context(cafile={str(cert)!r}))" in text
