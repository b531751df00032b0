"""The models local mode serves: one `LocalModel` each, behind one nginx.

A pure description (no processes): `LocalCluster` starts `replicas` server processes per model,
on consecutive ports in the order given, and nginx routes by the request's `model` field
(components/policies/model_routing.py) when there is more than one. `models_from_stack` reads
them from a parsed stack configuration.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from components.policies.model_routing import check_served_name

ENGINES = ("sim", "transformers")
SIM_NAME = "sim-llm"
"""The sim engine's own served name (server/settings.py) when none is set."""


@dataclass(frozen=True)
class LocalModel:
    """One model: its name for clients, how many replicas serve it and what they run."""

    served_name: str
    """What clients send as `model` (the replicas' LLM_SERVED_MODEL_NAME)."""
    replicas: int = 1
    """Server processes for this model (autoscaling starts from this many)."""
    engine: str = "sim"
    """`sim` (the latency model, no weights) or `transformers` (loads `model_id`)."""
    model_id: str | None = None
    """Hugging Face id or local directory the transformers engine loads (LLM_MODEL)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.engine == "transformers" and not self.model_id:
            raise ValueError(f"model {self.served_name!r}: the transformers engine needs a "
                             "model id (a hub id or a local directory)")
        if not isinstance(self.replicas, int) or isinstance(self.replicas, bool) \
                or self.replicas < 1:
            raise ValueError(f"model {self.served_name!r}: replicas must be at least 1, got "
                             f"{self.replicas!r}")

    def env(self) -> dict[str, str]:
        """What a replica of this model adds to its environment."""
        env = {"LLM_ENGINE": self.engine, "LLM_SERVED_MODEL_NAME": self.served_name}
        if self.model_id:
            env["LLM_MODEL"] = self.model_id
        return env


def check_models(models: Sequence[LocalModel]) -> tuple[LocalModel, ...]:
    """The models as a tuple; at least one, served names distinct and, with several (nginx
    routes by them), in the characters routing accepts."""
    models = tuple(models)
    if not models:
        raise ValueError("local mode needs at least one model")
    if len(models) > 1:
        for model in models:
            check_served_name(model.served_name)
    names = [m.served_name for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"served model names repeat: {', '.join(repeated)}; each model needs "
                         "its own name")
    return models


def stack_model_sections(cfg: Any) -> tuple[Any, ...]:
    """Each model of a parsed stack (`StackConfig`) as that model's view of it
    (`StackConfig.for_model`), in the stack's order (the first is the default model): the view's
    `model` is the model's section (served name, id), and its `replicas` and `autoscaling` are
    the model's own where it sets them (`models[i].replicas`, `models[i].autoscaling`), else
    the stack's."""
    return tuple(cfg.model_views())


def models_from_stack(cfg: Any, *, engine: str = "sim", replicas: int | None = None,
                      ) -> tuple[LocalModel, ...]:
    """Every model of a parsed stack as `LocalModel`s, under its served name.

    `engine` sim (default) serves each name with the latency model; transformers loads each
    model's `id`. `replicas` overrides every model's count; otherwise each model starts with
    what its Deployment starts with in the cluster: its autoscaling minReplicas when the stack
    autoscales, else its replica count (each the model's own where it sets one, else the
    stack's; at least 1: local mode does not scale to zero).
    """
    models = []
    for view in stack_model_sections(cfg):
        if replicas is not None:
            count = replicas
        elif view.autoscaling.enabled:
            count = view.autoscaling.min_replicas
        else:
            count = view.replicas
        models.append(LocalModel(
            served_name=view.model.served, replicas=max(int(count), 1), engine=engine,
            model_id=view.model.id if engine == "transformers" else None))
    return check_models(models)
