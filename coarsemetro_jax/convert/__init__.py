"""PyTorch checkpoints <-> Flax variables (FastMETRO, CoarseMETRO, ResNet-50).

`torch_file` reads and writes PyTorch files without torch; the conversion
tables and the command line (`python -m coarsemetro_jax.convert`) build on it.
"""
