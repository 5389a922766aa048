"""CuTe DSL device kernels for blasst_cute (see kernels/launch.py for the torch-facing glue)."""
