"""llm-serving: wires the stack's configuration into components and exports the result."""

import pulumi

from components.config.pulumi_source import load_stack_config
from components.resources.stack import LlmStack

config, secrets = load_stack_config()
stack = LlmStack("llm", {"config": config, "secrets": secrets})

pulumi.export("endpoint", stack.endpoint)
pulumi.export("models", stack.endpoints)
pulumi.export("apiKey", stack.api_key)
pulumi.export("image", stack.image)
pulumi.export("namespace", stack.namespace)
