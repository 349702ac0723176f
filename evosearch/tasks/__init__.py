"""lm-eval task files evosearch ships (YAML, and the Python their ``!function`` tags name)."""
