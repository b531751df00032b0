"""The stack configuration: every `llm-serving:*` key, parsed once into frozen models.

- `sections.py`: the base of every section (camelCase keys, unknown keys refused, frozen).
- `types.py`: shared field types (DNS labels, CIDRs, quantities) and the config namespace.
- `workload.py`, `exposure.py`, `monitoring.py`: the sections of the model pods, of how
  clients reach them, and of the Prometheus integration. The balancing, scaling and TLS
  sections live with the policies that own them (components/policies/).
- `stack.py`: `StackConfig`, the whole stack; `rules.py`: the rules that span sections;
  `parse.py`: raw values to `StackConfig`, each problem naming its key.
- `pulumi_source.py`: a running Pulumi program's values (the only module here that imports
  the Pulumi SDK).

Import from the modules themselves; this file imports nothing, so that a policy can build on
`sections.py` while `stack.py` composes the policies' sections.
"""
