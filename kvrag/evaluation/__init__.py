"""Metrics, answer extraction, the comparison runner, result store and reports."""
