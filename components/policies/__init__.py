"""One policy per concern, each one object rendered to every target it has.

- `balancing.py` (+ `affinity.py`): how NGINX spreads requests; the ingress controller's
  annotations, and `nginx_conf.py`'s nginx.conf for local mode and the benchmarks.
- `scaling.py`: the autoscaling rule; an HPA or KEDA ScaledObject, and the HPA algorithm that
  local mode runs against a real Prometheus.
- `alerting.py`: recording rules and SLO alerts; a PrometheusRule, and local mode's rule file.
- `dashboard.py`, `monitoring.py`: the Grafana dashboard and the ingress controller's metrics.
- `model_routing.py`: routing by the request body's `model`; local mode's nginx.conf with several
  models, and the Gateway path's model router (its nginx.conf, in a ConfigMap).
- `tls.py`: cert-manager's issuer and the Ingress's TLS annotations.
- `pod_security.py`: the Pod Security Standard labels of every namespace the stack creates.

Pure: no Pulumi SDK here (components/resources/ renders these into Pulumi resources).
"""
