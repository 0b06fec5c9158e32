"""Churn and rerouting scenarios that drive the real node code (see `churn.py`)."""
