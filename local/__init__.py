"""Local mode: the cluster recipe (replicas behind nginx) on one machine, no root, no Kubernetes.

`python -m local up` for people, `LocalCluster` for benchmarks and tests.
"""

from local.cluster import LocalCluster
from local.procs import LocalModeError

__all__ = ["LocalCluster", "LocalModeError"]
