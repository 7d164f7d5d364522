"""Hierarchy Drafting: n-gram databases (context, model, statistics) that draft tokens in microseconds."""
