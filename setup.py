"""Installs coarsemetro_jax (models, training, conversion) and data_pipelines."""

import setuptools

setuptools.setup(
    name='coarsemetro-jax',
    version='0.1.0',
    description='CoarseMETRO and FastMETRO human mesh recovery in JAX/Flax.',
    packages=setuptools.find_packages(include=['coarsemetro_jax*', 'data_pipelines*']),
    package_data={'coarsemetro_jax': ['assets/*.npz', 'assets/NOTICE*']},
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12',
        'ml-collections>=1.1.0',
        'clu==0.0.12',
        'numpy>=2.0',
        'scipy',
        'absl-py',
        'PyYAML',
        # tf.data input and clu writers; accelerator hosts without TF can still
        # import the jit-compiled core (models, losses, metrics, steps).
        'tensorflow-cpu>=2.21',
        'tensorboard>=2.21',
        'tensorflow-datasets>=4.9',
        'opencv-python-headless',
    ],
    extras_require={
        'fast': ['numba'],  # faster synthetic-data rasterizer
        'test': ['torch==2.13.0', 'pytest'],
    },
)
