# The one compiled part of roberta: the decoder of compressed checkpoints (zstd without the GIL, byte
# planes back into words). roberta.compress falls back to the zstandard package and numpy when it is
# not built, so a failed build costs speed, never correctness.
from setuptools import Extension, setup

setup(ext_modules=[Extension("roberta._planes", ["csrc/planes.c"], extra_compile_args=["-O3"], optional=True)])
