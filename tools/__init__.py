"""Offline tools whose outputs are committed; run from the repository root.

python -m tools.build_body_assets   the embedded body model and mesh
                                    hierarchy (coarsemetro_jax/assets/) from
                                    CC0 MakeHuman data; see its docstring
python -m tools.build_hand_assets   the embedded MANO-format hand and its
                                    778 / 195 hierarchy, from the same data
mesh_decimation                     their triangle-mesh geometry (a library)
"""
