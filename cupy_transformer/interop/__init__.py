"""Bridges to other frameworks. Nothing here is imported by ``import cupy_transformer``: each bridge is imported by
name and brings its framework with it (``cupy_transformer.interop.torch_ops`` imports torch), so torch stays optional.
"""
