# The one compiled part of roberta: byte-plane reassembly for compressed checkpoints. roberta.compress
# falls back to numpy when it is not built, so a failed build costs speed, never correctness.
from setuptools import Extension, setup

setup(ext_modules=[Extension("roberta._planes", ["roberta/_ext/planes.c"], extra_compile_args=["-O3"], optional=True)])
