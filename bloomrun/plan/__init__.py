"""`bloomctl plan`: the final model's size, shape and tokens from a GPU-hour budget (docs/plan.md).

arithmetic.py holds the paper's cost formulas (torch-free; the BloomStudy budget check uses
them too); the other modules build candidates, fits and manifests as data, without I/O.
"""
