"""The layers, one module per family, each backward beside its forward.

The machinery built on the layer protocol (gradients, checks, training, per-example
quantities, curvature) lives one level up, in :mod:`jbp`; every layer is also at ``jbp.*``.
"""
