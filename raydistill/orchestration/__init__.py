"""Orchestration: the only layer that imports Ray and MLflow."""
