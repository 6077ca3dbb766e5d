# The one compiled part of roberta: the decoder of compressed checkpoints (zstd without the GIL, byte
# planes back into words; ZipNN's chunks through zstd's Huffman decoder). roberta.compress falls back
# to the zstandard package and numpy when it is not built, roberta.znn to the zipnn package, so a
# failed build costs speed (and, for ZipNN files, the zipnn package), never correctness.
from setuptools import Extension, setup

setup(ext_modules=[Extension("roberta._planes", ["csrc/planes.c"], extra_compile_args=["-O3"], optional=True)])
