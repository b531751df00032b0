"""Field types shared by the configuration sections (components/config/stack.py and the policy
modules that own a section), with messages a user can act on."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, Field

NAMESPACE = "llm-serving"
"""Pulumi config namespace (the project name): every key is `llm-serving:<path>`."""

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _dns_label(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise ValueError(
            "must be a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


DnsLabel = Annotated[str, AfterValidator(_dns_label)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_MEMORY_FACTORS = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}


def _cpu(value: str) -> str:
    if not _CPU.match(value):
        raise ValueError("must be a Kubernetes CPU quantity such as '500m' or '2'")
    return value


def _memory(value: str) -> str:
    if not _MEMORY.match(value):
        raise ValueError("must be a Kubernetes memory quantity such as '512Mi' or '16Gi'")
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    for key, val in value.items():
        if not _LABEL_KEY.match(key):
            raise ValueError(f"label key {key!r} is not a valid Kubernetes label key")
        if not _LABEL_VALUE.match(val):
            raise ValueError(
                f"label value {val!r} (key {key!r}) must be at most 63 characters of "
                "letters, digits, '-', '_' or '.', starting and ending alphanumeric"
            )
    return value


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR range such as '203.0.113.0/24'") from None
    return value


def api_path(value: str) -> str:
    if value != "/v1" and not value.startswith("/v1/"):
        raise ValueError("must be /v1 or a path below it: only the OpenAI API is published")
    return value


_MODEL_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+)+/v1$")


def model_path(value: str) -> str:
    """An Ingress path prefix of a model other than the first: it must end in /v1 (clients
    use it as their base URL) and stay outside /v1, which is the first model's."""
    if not _MODEL_PATH.match(value) or value == "/v1" or value.startswith("/v1/"):
        raise ValueError(
            "must be a path that ends in /v1 and lies outside /v1 (the first model's), made "
            "of letters, digits and '.', '_', '~', '-', e.g. /coder/v1"
        )
    return value


def cpu_cores(quantity: str) -> float:
    """'500m' -> 0.5, '2' -> 2.0."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity: str) -> float:
    """'16Gi' -> 17179869184.0."""
    match = re.match(r"^([\d.]+)(\D*)$", quantity)
    assert match, quantity  # guaranteed by _memory
    return float(match.group(1)) * _MEMORY_FACTORS[match.group(2)]


CpuQuantity = Annotated[str, AfterValidator(_cpu)]
MemoryQuantity = Annotated[str, AfterValidator(_memory)]
Labels = Annotated[dict[str, str], AfterValidator(_labels)]
Cidr = Annotated[str, AfterValidator(_cidr)]
