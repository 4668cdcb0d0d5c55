"""Native kernels that XLA lacks on some platform, each with an XLA fallback (cpu_matmul: decode matmuls)."""
