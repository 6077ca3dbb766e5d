# The compiled parts of roberta, each optional: a failed build costs speed, never correctness.
# - roberta._planes: the decoder of compressed checkpoints (zstd without the GIL, byte planes back into
#   words; ZipNN's chunks through zstd's Huffman decoder); roberta.compress falls back to the zstandard
#   package and numpy without it, roberta.znn to the zipnn package (then needed for ZipNN files).
# - roberta._kernels: the int8 encoder's element-wise steps in one pass each, each sublayer's residual
#   addition and LayerNorm in one pass, GELU, and self-attention on packed sequences, for CPU inference
#   (AVX-512 or AVX2); roberta.inference and roberta.model fall back to the same steps in PyTorch without it.
#   -ffp-contract=off keeps the int8 steps bit for bit equal; -fopenmp runs them on PyTorch's threads (the
#   libgomp torch has already loaded when roberta imports this). A compiler without OpenMP (clang without
#   libomp) builds them again without it: the same kernels, each on one thread.
# - roberta._mkl_paths: lets MKL choose its code path by instruction set on any vendor's CPU (see the file);
#   without it MKL keeps its own choice.
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, LinkError

OPENMP = "-fopenmp"


class BuildExt(build_ext):
    """Builds an extension that asks for OpenMP again without it where the compiler has none."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, LinkError):
            if OPENMP not in ext.extra_compile_args:
                raise
            print(f"warning: {ext.name} did not build with OpenMP; building it without (its kernels on one thread)")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
            super().build_extension(ext)


setup(cmdclass={"build_ext": BuildExt}, ext_modules=[
    Extension("roberta._planes", ["csrc/planes.c"], extra_compile_args=["-O3"], optional=True),
    Extension("roberta._kernels", ["csrc/kernels.c"], depends=["csrc/lanes.h"],
              extra_compile_args=["-O3", "-ffp-contract=off", OPENMP, "-Wno-psabi"],  # 64-byte vectors, inlined
              extra_link_args=[OPENMP], optional=True),
    Extension("roberta._mkl_paths", ["csrc/mkl_paths.c"], optional=True),
])
