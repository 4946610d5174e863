"""A side-by-side benchmark of an mtlsmesh sidecar pair against a stunnel pair, in two network namespaces.

Run it as root with `python -m bench` (see bench/README.md). It is not a test: it asserts nothing about the
numbers, it measures and prints them next to the targets.
"""
