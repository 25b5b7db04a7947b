"""Native kernel sources, shipped as package data and compiled on first use.

This file makes the folder importable as ``lightning_3d.csrc`` in every kind of install (wheel or
editable), so the sources are always found with
``importlib.resources.files("lightning_3d.csrc")``. See ``README.md`` here for the conventions.
"""
