"""Synthetic METRO-format dataset rendered from the embedded body model.

Modules: `pose_sampler` (plausible poses and adult shapes), `rasterizer`
(NumPy / numba z-buffer), `body_np` (JAX-free skinning), `appearance`
(clothing colours, backgrounds), `render` (one example and its METRO label),
`generate` (parallel, streaming TSV writer); `python -m data_pipelines.synthetic`
is the command line.
"""
