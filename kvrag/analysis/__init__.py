"""Analyses of how a model reads its in-context documents."""
