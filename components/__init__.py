"""Pulumi components that deploy, expose and secure LLM inference servers."""

from components.api_key import ApiKey, ApiKeyArgs
from components.config import ConfigError, StackConfig, load_stack_config, parse_stack_config
from components.deployment import LlmDeployment, LlmDeploymentArgs
from components.image import LlmImage, LlmImageArgs
from components.service import LlmService, LlmServiceArgs
from components.stack import LlmStack, LlmStackArgs

__all__ = [
    "ApiKey", "ApiKeyArgs", "ConfigError", "LlmDeployment", "LlmDeploymentArgs",
    "LlmImage", "LlmImageArgs", "LlmService", "LlmServiceArgs", "LlmStack",
    "LlmStackArgs", "StackConfig", "load_stack_config", "parse_stack_config",
]
