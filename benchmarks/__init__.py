"""Efficiency benchmarks; each prints markdown tables (no speed is asserted).

Run from the repository root, as modules (`--help` lists each one's flags):

  python -m benchmarks.inference         forward latency and throughput, JAX vs
                                         PyTorch eager, same weights
  python -m benchmarks.train_step        training-step throughput, JAX vs
                                         PyTorch eager, same weights and loss
  python -m benchmarks.memory            XLA peak memory per step and
                                         activation/FLOP counts per image
  python -m benchmarks.input_pipeline    tf.data decode + augment + batch,
                                         examples/s per parallelism
  python -m benchmarks.synthetic_render  synthetic-data rendering, samples/s
                                         per core and a 10k-set estimate
  python -m benchmarks.crop_difference   'metro' vs 'continuous' crop: image,
                                         shift and 2D keypoint differences

The first three take `--tiny --quick` for a smoke run (configs/tiny.py models,
two rounds) and need torch: their PyTorch side is the `torch_reference`
package at the repository root. `_timing` is their shared harness
(identical-weight model pairs, interleaved timing rounds, tables).
"""
