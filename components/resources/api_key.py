"""ApiKey: the bearer key clients present, generated unless given, kept in a Secret."""

from __future__ import annotations

from typing import Mapping, NotRequired, TypedDict

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

SECRET_KEY = "api-key"
"""Key of the API key inside the Kubernetes Secret."""


class ApiKeyArgs(TypedDict):
    namespace: pulumi.Input[str]
    """Namespace of the Secret; the pods that read it live there too."""
    value: NotRequired[pulumi.Input[str] | None]
    """A key given by the operator (a Pulumi secret); None generates one."""
    labels: NotRequired[Mapping[str, str]]
    length: NotRequired[int]
    """Length of a generated key; 48 alphanumerics is about 285 bits."""


class ApiKey(pulumi.ComponentResource):
    value: pulumi.Output[str]
    """The key, always a Pulumi secret."""
    secret_name: pulumi.Output[str]
    """Name of the Kubernetes Secret holding the key under `api-key`."""

    def __init__(
        self, name: str, args: ApiKeyArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("llm-serving:index:ApiKey", name, None, opts)
        length = args.get("length", 48)
        if length < 32:
            raise ValueError(f"ApiKey: 'length' must be at least 32, got {length}")
        given = args.get("value")
        if given is None:
            # Alphanumeric only: the key travels in HTTP headers and shell examples.
            generated = random.RandomPassword(
                f"{name}-random",
                length=length,
                special=False,
                opts=pulumi.ResourceOptions(parent=self),
            )
            value = generated.result
        else:
            value = pulumi.Output.from_input(given)
        self.value = pulumi.Output.secret(value)
        secret = k8s.core.v1.Secret(
            f"{name}-secret",
            metadata={"namespace": args["namespace"], "labels": dict(args.get("labels", {}))},
            type="Opaque",
            string_data={SECRET_KEY: self.value},
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.secret_name = secret.metadata.name
        self.register_outputs({"value": self.value, "secret_name": self.secret_name})
