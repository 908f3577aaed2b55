"""Builds langmerge's optional C extension (the fused CPU merge kernels); everything else is in pyproject.toml.

Without a C compiler the build of the extension fails quietly (``optional``)
and merges plan the reference torch kernel instead (docs/methods.md, "Kernels").
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "langmerge.methods._fused",
            sources=["src/langmerge/methods/_fused.c"],
            # no fused multiply-add: the kernels must give the bits of torch's separate operations
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno"],
            extra_link_args=["-pthread"],
            libraries=["m"],
            optional=True,
        )
    ]
)
