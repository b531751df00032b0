"""Deploy, expose, balance and scale LLM inference servers: the layers, bottom up.

- `components.pins`, `components.engines`: upstream versions and what differs between engines.
- `components.config`: the stack configuration's sections, parsed once into frozen models.
- `components.policies`: one policy per concern (balancing, scaling, alerting, TLS...), each
  rendered to every target: the cluster's objects and local mode's nginx, Prometheus and
  autoscaler. Pure: no Pulumi SDK.
- `components.resources`: the Pulumi components that compose them into a stack (`LlmStack`).

Only `components.resources` and `components.config.pulumi_source` import the Pulumi SDK, so
local mode, the server and the benchmarks run without it; this file imports nothing, so that
importing a policy never pulls in the resources.
"""
