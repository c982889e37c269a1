"""Optuna sweeps: the search space, the study and its journal, the worker, the report."""
