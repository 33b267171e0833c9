"""Hand-written PyTorch reference models for parity tests and benchmarks.

State-dict keys are those of FastMETRO's released checkpoints (torchvision
ResNet layout, `FastMETRO_Body_Network`, METRO's `HighResolutionNet`) and, for
CoarseMETRO, the layout defined in coarsemetro_jax/convert/tables.py. A dev
and test package, not installed by setup.py: the tests and
`python -m benchmarks.<name>` import it from the repository root. Only
imported when torch is installed.
"""
