"""Synthetic METRO-format dataset rendered from the embedded body model.

Modules: `pose_sampler` (plausible poses and adult shapes), `body_np`
(JAX-free skinning), `appearance` (clothing colours, backgrounds), `render`
(one example and its METRO label, drawn with `coarsemetro_jax.rasterizer`),
`generate` (parallel, streaming TSV writer); `python -m data_pipelines.synthetic`
is the command line.
"""
