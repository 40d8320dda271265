"""The compiled fast path (gproxy/_dataplane.pyx), built where Cython and a C compiler are;
where they are not, the build goes on without it and gproxy runs its pure-Python data plane
(gproxy/dataplane.py), slower. GPROXY_NO_EXTENSIONS=1 skips it here, as it does at import;
GPROXY_CHECKED_BUILD=1 builds it with Cython's bounds and None checks on (for the fuzz tier)."""

import os

from setuptools import Extension, setup


def extensions() -> list[Extension]:
    if os.environ.get("GPROXY_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    checked = bool(os.environ.get("GPROXY_CHECKED_BUILD"))
    macros = [("GPROXY_CHECKED_BUILD", "1")] if checked else []
    compiled = cythonize(
        [Extension("gproxy._dataplane", ["gproxy/_dataplane.pyx"], define_macros=macros)],
        compiler_directives={
            "language_level": 3, "boundscheck": checked, "wraparound": checked,
            "initializedcheck": checked, "nonecheck": checked,
        },
        # Always: the directives are not among what cythonize compares, so a C file left by a
        # build of the other kind would be compiled again as it is (a "checked" build that
        # checks nothing, or the reverse).
        force=True,
        quiet=True,
    )
    for extension in compiled:
        extension.optional = True  # (no compiler: the build goes on without it; set here, cythonize drops it)
    return compiled


setup(ext_modules=extensions())
