"""Native kernels for paths XLA compiles poorly on some backend."""
