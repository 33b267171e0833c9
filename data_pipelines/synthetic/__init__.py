"""Synthetic METRO-format datasets rendered from the embedded body and hand models.

Modules: `pose_sampler` (plausible poses and adult shapes), `body_np`
(JAX-free skinning), `appearance` (clothing colours, backgrounds), `render`
(one example and its METRO label, drawn with `coarsemetro_jax.rasterizer`),
`generate` (parallel, streaming TSV writer); for hands `hand_pose_sampler`
(finger poses within joint limits), `hand_np` (JAX-free MANO skinning) and
`hand_render` (a right or left hand, FreiHAND's label). `python -m
data_pipelines.synthetic [--hand]` is the command line.
"""
