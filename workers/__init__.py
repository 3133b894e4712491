"""Turnout's workers: launch and supervise warm ``mlflow models serve`` processes."""
