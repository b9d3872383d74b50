"""Build hook: compiles the datapath kernels (C through cffi) at install time."""

from setuptools import find_namespace_packages, setup

packages = [f"vhostmap.{p}" for p in find_namespace_packages("backend/vhostmap")] + ["vhostmap"]
packages += [f"vhostmap_guest.{p}" for p in find_namespace_packages("guest/vhostmap_guest")] + [
    "vhostmap_guest"
]

setup(
    packages=sorted(p for p in packages if "__pycache__" not in p),
    cffi_modules=["backend/vhostmap/datapath/build.py:ffibuilder"],
)
