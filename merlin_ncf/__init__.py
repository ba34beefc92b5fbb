"""merlin-ncf: an end-to-end recommender on NVIDIA Merlin.

This package is the shared core every stage imports (the stage contract in feature_spec,
atomic outputs, the one error type and CLI convention). The stages are its subpackages,
kept in the repository's top-level folders: merlin_ncf.workflows (workflows/, ETL),
merlin_ncf.models (models/, training) and merlin_ncf.serving (serving/, Triton).
Imports run one way: serving -> models -> core, workflows -> core.
"""
