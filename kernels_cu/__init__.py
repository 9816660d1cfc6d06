"""The CUDA C sources (``*.cu``, ``*.cuh``), installed as package data and read through importlib.resources."""
