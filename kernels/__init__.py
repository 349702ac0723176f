"""GPU kernels (Triton), each with a PyTorch reference; shipped as ``evosearch.kernels``."""
