"""Orchestration: the only layer that imports Ray and MLflow.

Importing it sets Ray's loopback-only environment first: Ray reads it when ``ray`` is imported, so it must be in
place before any ``import ray`` (see :mod:`raydistill.orchestration.runtime`).
"""

from raydistill.orchestration.runtime import apply_loopback_env

apply_loopback_env()
