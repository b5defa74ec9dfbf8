"""Builds the Cython extensions from ``_core/``.

``nvmefs._core`` (the driver core) and ``nvmefs._model`` (the device side:
software controller, echo device, bench loops) each include their component
.pyx files in a stated order (the uvloop layout); the model reaches the core
only through ``nvmefs/_core.pxd``.  C-only declarations live in
``_core/include`` (.h and .pxd) which is on both the C and the Cython include
path.  NVMEFS_DEBUG=1 builds with assertions, bounds checks and Cython line
tracing (for coverage and profilers).
"""
import os

from setuptools import Extension, setup
from Cython.Build import cythonize

DEBUG = os.environ.get("NVMEFS_DEBUG", "") not in ("", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join("_core", "include")

if DEBUG:
    cflags = ["-O0", "-g3", "-UNDEBUG", "-DNVMEFS_DEBUG=1"]
    # CYTHON_TRACE_NOGIL stays off: traced nogil code takes the GIL at every
    # function entry, which stalls the controller model's thread behind the
    # trio thread (seen: polled-mode commands timing out in the debug build)
    macros = [("CYTHON_TRACE", "1")]
    directives = {"boundscheck": True, "wraparound": True, "linetrace": True,
                  "initializedcheck": True}
else:
    cflags = ["-O3", "-DNDEBUG"]
    macros = []
    directives = {"boundscheck": False, "wraparound": False, "initializedcheck": False}

directives.update({"language_level": 3, "embedsignature": True, "cdivision": True})


def core_extension(name, pyx, libraries=()):
    return Extension(
        name,
        sources=[os.path.join("_core", pyx)],
        depends=[os.path.join("nvmefs", "_core.pxd")],
        include_dirs=[INCLUDE],
        define_macros=macros,
        extra_compile_args=cflags + ["-std=gnu11", "-Wno-unused-function"],
        extra_link_args=["-pthread"],
        libraries=list(libraries),
    )


# The driver core, and apart from it the device side (software controller,
# echo device, bench loops), which sees the core only through nvmefs/_core.pxd.
# The lanes' FUSE over io_uring uses liburing (Debian's liburing-dev).
core = core_extension("nvmefs._core", "_core.pyx", libraries=["uring", "isal"])
model = core_extension("nvmefs._model", "_model.pyx")


def pkg_config(flag, default):
    import shlex
    import subprocess
    try:
        out = subprocess.run(["pkg-config", flag, "fuse3"], check=True, capture_output=True, text=True)
        return shlex.split(out.stdout)
    except (OSError, subprocess.CalledProcessError):
        return default


# Separate from _core: it links libfuse and is loaded RTLD_GLOBAL so that
# pyfuse3's libfuse calls resolve to it (_core/fuseshim/shim.h), which the
# driver core has no business being.
fuse_cflags = pkg_config("--cflags", ["-I/usr/include/fuse3"])
FUSESHIM = os.path.join("_core", "fuseshim")
fuseshim = Extension(
    "nvmefs._fuseshim",
    sources=[os.path.join(FUSESHIM, "_fuseshim.pyx"), os.path.join(FUSESHIM, "interpose.c"),
             os.path.join(FUSESHIM, "forward.c")],
    depends=[os.path.join(FUSESHIM, "shim.h")],
    include_dirs=[FUSESHIM] + [f[2:] for f in fuse_cflags if f.startswith("-I")],
    extra_compile_args=["-O2", "-std=gnu11"] + [f for f in fuse_cflags if not f.startswith("-I")],
    extra_link_args=pkg_config("--libs", ["-lfuse3"]) + ["-ldl", "-pthread"],
)

extensions = cythonize(
    [core, model, fuseshim],
    # "." finds nvmefs/_core.pxd, the core's declarations for the model
    include_path=[INCLUDE, "_core", "."],
    compiler_directives=directives,
    # a changed build mode must regenerate the C file
    force=DEBUG,
)
setup(ext_modules=extensions)
