"""Bridges to other frameworks. Nothing here is imported by ``import cupy_transformer``: each bridge is imported by
name and brings its framework with it, so torch stays optional: ``cupy_transformer.interop.torch_ops`` (our ops as
PyTorch custom ops) imports torch, ``cupy_transformer.interop.torch`` (``inject``: our kernels under a Hugging Face
model's ``forward`` and ``generate``) imports torch and transformers.
"""
