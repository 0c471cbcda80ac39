"""Packaging for Dataflow workers: ``--setup_file ./setup.py`` ships these packages to every worker.

Workers need the same code the driver imports (pipelines, transforms, data_sources, tokenminds_model). Heavy
dependencies are better baked into the worker container (see Dockerfile); ``install_requires`` keeps a plain worker
working too.
"""
import setuptools

REQUIRED = [
    "apache-beam[gcp]==2.77.0",
    "tensorflow==2.21.0",
    "tensorflow-transform==1.21.0",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "pyarrow==25.0.1",
    "numpy==2.4.6",
    "sentencepiece==0.2.3",
    "google-cloud-bigquery==3.47.0",
    "tqdm==4.70.1",
]

setuptools.setup(
    name="tokenminds-pipelines",
    version="0.1.0",
    description="TokenMinds: Semantic-ID user tokens and embeddings, built with Apache Beam and JAX.",
    packages=setuptools.find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*",
                                               "data_sources", "data_sources.*",
                                               "tokenminds_model", "tokenminds_model.*"]),
    install_requires=REQUIRED,
    python_requires=">=3.11,<3.12",
)
