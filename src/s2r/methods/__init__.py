"""Sim2real methods; one module per method, named as in params.yaml, the CLI, DVC and MLflow."""
