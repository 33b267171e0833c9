"""Hand-written PyTorch reference models for checkpoint-conversion parity tests.

Key names follow the FastMETRO reference §1.9 (torchvision ResNet layout,
`FastMETRO_Body_Network`) and, for CoarseMETRO, the layout defined in
coarsemetro_jax/convert/tables.py. Only imported when torch is installed.
"""
