"""Grafana dashboard as code: one dashboard per stack, built with the Grafana
Foundation SDK and shipped as a ConfigMap the kube-prometheus-stack Grafana
sidecar loads (label `grafana_dashboard: "1"`).

Panel queries read the engine's own series (names from the engine profile),
not the recorded ones, so the dashboard works without the alert rules. A stack with several
models has one dashboard whose latency and load series are split by model
(`engines.MODEL_LABEL`, legend `{{model_name}}`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import DataSourceRef, Threshold, ThresholdsMode

from components.engines import MODEL_LABEL
from components.policies.monitoring import CONTROLLER_LATENCY_METRIC, controller_metrics_enabled

if TYPE_CHECKING:
    from components.config.stack import StackConfig

SIDECAR_LABEL = {"grafana_dashboard": "1"}
"""kube-prometheus-stack's Grafana sidecar loads ConfigMaps with this label (its default)."""

_DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
_RATE = "$__rate_interval"


def dashboard_uid(cfg: "StackConfig") -> str:
    """Stable across renders (Grafana keys dashboards by uid); at most 40 characters."""
    return f"llm-serving-{cfg.namespace}"[:40]


class _Queries:
    """PromQL of one stack: the engine profile's names, scoped to the stack's namespace."""

    def __init__(self, cfg: "StackConfig") -> None:
        self.profile = cfg.profile
        self.namespace = cfg.namespace
        self.by_model = cfg.model_count > 1
        """Several models: every aggregate keeps the model label, one series per model."""

    def sel(self, name: str, **extra: str) -> str:
        pairs = [("namespace", self.namespace), *sorted(extra.items())]
        return name + "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"

    def _by(self, *labels: str) -> str:
        labels = (*labels, MODEL_LABEL) if self.by_model else labels
        return f" by ({', '.join(labels)})" if labels else ""

    def quantile(self, q: float, histogram: str) -> str:
        return (
            f"histogram_quantile({q}, sum{self._by('le')} "
            f"(rate({self.sel(histogram + '_bucket')}[{_RATE}])))"
        )

    def rate(self, series: str) -> str:
        return f"sum{self._by()}(rate({series}[{_RATE}]))"

    def agg(self, how: str, series: str) -> str:
        """`how` (sum, count) over the stack, per model where there are several."""
        return f"{how}{self._by()}({series})"

    def legend(self, text: str) -> str:
        return f"{{{{{MODEL_LABEL}}}}} {text}" if self.by_model else text


def _target(expr: str, legend: str, ref: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def _series(title: str, unit: str, targets: list[tuple[str, str]], width: int = 12,
            threshold: float | None = None, description: str = "") -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).description(description).unit(unit)
        .datasource(_DATASOURCE).span(width).height(8)
    )
    for i, (expr, legend) in enumerate(targets):
        panel = panel.with_target(_target(expr, legend, chr(ord("A") + i)))
    if threshold is not None:
        # A dashed line at the objective the alert rules use.
        panel = panel.thresholds(
            dash.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([
                _step(None, "green"), _step(threshold, "red"),
            ])
        ).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.DASHED)
        )
    return panel


def _step(value: float | None, color: str) -> Threshold:
    return Threshold(value=value, color=color)


def _stat(title: str, expr: str, unit: str = "none", width: int = 6) -> stat.Panel:
    return (
        stat.Panel().title(title).unit(unit).datasource(_DATASOURCE).span(width).height(4)
        .with_target(_target(expr, title, "A"))
    )


def _max_replicas(cfg: "StackConfig") -> float | None:
    """The autoscaling ceiling the Replicas panel marks, when every model shares one."""
    if not cfg.autoscaling.enabled:
        return None
    ceilings = {view.autoscaling.max_replicas for view in cfg.model_views()}
    return float(ceilings.pop()) if len(ceilings) == 1 else None


def build_dashboard(cfg: "StackConfig") -> dict[str, Any]:
    """The dashboard of one stack, as the JSON model Grafana imports."""
    q, p = _Queries(cfg), cfg.profile
    slo = cfg.monitoring.slo
    finished = q.sel(p.e2e_histogram + "_count")
    served = ", ".join(m.served for m in cfg.models)
    board = (
        dash.Dashboard(f"LLM serving: {served} ({cfg.namespace})")
        .uid(dashboard_uid(cfg))
        .tags(["llm-serving", p.name])
        .refresh("30s")
        .time("now-1h", "now")
        .readonly()
        .with_variable(dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_row(dash.Row("Now"))
        .with_panel(_stat("Requests/s", q.rate(finished), "reqps"))
        .with_panel(_stat("Replicas reporting", q.agg("count", q.sel(p.running_metric))))
        .with_panel(_stat("Running", q.agg("sum", q.sel(p.running_metric))))
        .with_panel(_stat("Waiting", q.agg("sum", q.sel(p.waiting_metric))))
        .with_row(dash.Row("Latency"))
        .with_panel(_series(
            "Time to first token", "s",
            [(q.quantile(0.5, p.ttft_histogram), q.legend("p50")),
             (q.quantile(0.99, p.ttft_histogram), q.legend("p99"))],
            threshold=slo.ttft_p99_seconds,
            description=f"Dashed: the p99 objective (monitoring.slo.ttftP99Seconds = {slo.ttft_p99_seconds} s).",
        ))
        .with_panel(_series(
            "End-to-end request latency", "s",
            [(q.quantile(0.5, p.e2e_histogram), q.legend("p50")),
             (q.quantile(0.99, p.e2e_histogram), q.legend("p99"))],
        ))
    )
    if p.itl_histogram is not None:
        board = board.with_panel(_series(
            "Inter-token latency", "s",
            [(q.quantile(0.5, p.itl_histogram), q.legend("p50")),
             (q.quantile(0.99, p.itl_histogram), q.legend("p99"))],
        ))
    board = (
        board.with_row(dash.Row("Load"))
        .with_panel(_series("Requests/s", "reqps", [(q.rate(finished), q.legend("finished"))]))
        .with_panel(_series(
            "Queue per replica", "short",
            [(f"sum by (pod) ({q.sel(p.waiting_metric)})", "waiting {{pod}}"),
             (f"sum by (pod) ({q.sel(p.running_metric)})", "running {{pod}}")],
            threshold=float(cfg.autoscaling.target_waiting_per_replica),
            description="Dashed: autoscaling.targetWaitingPerReplica, the backlog alert's threshold.",
        ))
        .with_panel(_series(
            "Replicas", "short",
            [(q.agg("count", q.sel(p.running_metric)), q.legend("replicas reporting"))],
            threshold=_max_replicas(cfg),
        ))
    )
    refusals = [(q.rate(ref.selector({"namespace": cfg.namespace})), q.legend(legend))
                for ref, legend in ((p.refused, "429 overload"), (p.unavailable, "503 draining"))
                if ref is not None]
    if refusals:
        board = board.with_panel(_series("Refused requests/s", "reqps", refusals))
    if p.kv_cache_metric is not None:
        board = board.with_panel(_series(
            "KV-cache use", "percentunit",
            [(f"max by (pod) ({q.sel(p.kv_cache_metric)})", "{{pod}}")],
        ))
    if controller_metrics_enabled(cfg):
        latency = (
            f"histogram_quantile({{q}}, sum by (le) (rate({CONTROLLER_LATENCY_METRIC}_bucket"
            f'{{{{resource_namespace="{cfg.namespace}"}}}}[{_RATE}])))'
        )
        board = (
            board.with_row(dash.Row("Ingress controller"))
            .with_panel(_series(
                "Upstream response latency (controller)", "ms",
                [(latency.format(q=0.5), "p50"), (latency.format(q=0.99), "p99")], width=24,
            ))
        )
    model = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    # Grafana needs a unique id per panel (links and "view panel" use it).
    for number, panel in enumerate(model["panels"], start=1):
        panel["id"] = number
    return model
