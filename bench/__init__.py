"""Component micro-benchmarks and end-to-end benchmark scripts (``make bench``): not part of the installed product.

They import loragate's internals (and examples/ for the tiny model), so they live outside the
``loragate`` namespace and run from the repository root as ``python -m bench.<script>``.
"""
