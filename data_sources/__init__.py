"""Where the pipelines' raw inputs come from when there is no production landing zone: the synthetic sample generator
(``sample_data``) and the public-dataset importer (``dataset_import``). Plain NumPy/Arrow writers of the data
contract's layout (``transforms/schemas.py``), not Beam transforms, so they live apart from ``transforms/``.
"""
