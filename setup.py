"""The one compiled part: llamatrt's int4 kernel for ONNX Runtime (runtime/kernels/matmul_int4.c), a
shared library ONNX Runtime loads by path (SessionOptions.register_custom_ops_library), built here
as an extension so that `pip install` compiles it. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "llamatrt.runtime._matmul_int4",
            sources=["runtime/kernels/matmul_int4.c"],
            extra_compile_args=["-O3", "-std=c11", "-fvisibility=hidden"],
            define_macros=[("MATMUL_INT4_PYTHON_MODULE", "1")],
            libraries=["m"],
            optional=True,  # no compiler: the install goes on, and exports use MatMulNBits' own kernel
        )
    ]
)
