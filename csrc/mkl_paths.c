/* MKL's code path by instruction set, whatever the CPU's vendor.
 *
 * MKL picks its kernels by the instruction sets the CPU has and, before that, asks whether the CPU is
 * Intel's: on any other (an AMD EPYC, say) it takes a generic path. On an AVX2-only AMD EPYC (Zen 3)
 * that path ran a [32 x 768] x [768 x 3072] float32 product at 53-78 GFLOP/s where the AVX2 path ran it
 * at 87-126 (benchmarks/RESULTS.md). MKL asks through `mkl_serv_intel_cpu_true`, which PyTorch's
 * libtorch_cpu exports and calls through the dynamic linker: roberta/runtime.py loads this library into
 * the global symbol scope before torch loads, so MKL finds this definition first and chooses by
 * instruction set alone. MKL still reads the CPU's feature bits for which instructions to use.
 * ROBERTA_MKL_PATHS=vendor leaves MKL's own choice (this library is then not loaded).
 */
#include <Python.h>

int mkl_serv_intel_cpu_true(void) { return 1; }

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_mkl_paths",
                                    "MKL's code path by instruction set (loaded by roberta/runtime.py)", -1, NULL};

PyMODINIT_FUNC PyInit__mkl_paths(void) { return PyModule_Create(&module); }
