"""Offline tools whose outputs are committed; run from the repository root.

python -m tools.build_body_assets   the embedded body model and mesh
                                    hierarchy (coarsemetro_jax/assets/) from
                                    CC0 MakeHuman data; see its docstring
mesh_decimation                     its triangle-mesh geometry (a library)
"""
