"""How a process runs, and only what the ``runtime:`` config section names: the Accelerator, CUDA graphs,
compile, memory format, host memory."""
