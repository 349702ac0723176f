"""Ready search spaces as YAML files, shipped as ``evosearch.spaces``."""
