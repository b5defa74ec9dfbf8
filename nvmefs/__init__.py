"""nvmefs: a userspace NVMe driver with a Cython core that exposes each
namespace as a file through FUSE."""

__version__ = "0.1.0"
