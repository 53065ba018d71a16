"""Build script. The package is pure Python until csrc/ holds the C++ extension (a later step);
setuptools then builds nothing and the install succeeds."""
from setuptools import setup

setup()
