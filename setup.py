"""Builds the CPU decode kernel safevlm_jax/kernels/matvec.cc against jaxlib's XLA FFI
headers (jaxlib is a build requirement); the rest of the package is described in
pyproject.toml. The kernel is optional: without a C++ compiler the install still succeeds
(pip prints the build error) and decode on CPU uses XLA's dots, with a warning at run time;
tests/test_cpu_matvec.py fails on such an install."""

import importlib.util
import os

from setuptools import Extension, setup


def xla_ffi_include() -> str:
    return os.path.join(importlib.util.find_spec("jaxlib").submodule_search_locations[0], "include")


setup(ext_modules=[Extension(
    "safevlm_jax.kernels._matvec", ["safevlm_jax/kernels/matvec.cc"], language="c++", optional=True,
    # -Wno-maybe-uninitialized: GCC 12 warns inside its own AVX-512 headers
    extra_compile_args=["-O3", "-std=c++17", "-Wno-maybe-uninitialized", "-isystem", xla_ffi_include()])])
