# pyproject.toml is the source of truth; this stub serves tools that still call setup.py.
from setuptools import setup

setup()
