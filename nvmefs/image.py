"""Where the built-in controller's image lives, and the checks an image
path passes before anything is created or opened."""
import os
import stat

from nvmefs.errors import UsageError


def default_image():
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "nvmefs", "nvme0.img")


def create_image(path, size, namespaces, lba_size, capacity=None):
    """A new sparse image of ``namespaces`` equal namespaces sharing ``size``
    bytes, with ``capacity`` bytes of NVM in all (default: what they take;
    with no namespaces, ``size``); returns the bytes per namespace."""
    from nvmefs._model import create_image as create
    if capacity is not None and capacity < size:
        raise UsageError(f"capacity {capacity} is smaller than the namespaces' size {size}")
    if namespaces == 0:
        capacity = capacity or size
        per = 0
    else:
        # whole 4 KiB blocks, so that Format NVM can switch either way
        per = size // namespaces // 4096 * 4096
        if per == 0:
            raise UsageError(f"size {size} is too small for {namespaces} namespaces")
    if capacity is not None and capacity % 4096:
        raise UsageError(f"capacity {capacity} is not a multiple of 4096")
    try:
        create(path, tuple((per, lba_size) for _ in range(namespaces)), capacity=capacity)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return per


def create_raw_image(path, size):
    """A new sparse raw disk image (no header): one namespace over all of it."""
    from nvmefs._model import create_raw_image as create
    create(path, size)


def probe_image(path):
    """{"format": "nvmefs", header...} or {"format": "raw", "file_size": ...}."""
    from nvmefs._model import probe_image as probe
    return probe(path)


def read_image_header(path):
    from nvmefs._model import read_image_header as read
    return read(path)


def check_image(path, size, lba_size, create):
    """Returns True when the image must be created."""
    if os.path.exists(path):
        if not (os.path.isfile(path) or stat.S_ISBLK(os.stat(path).st_mode)):
            raise UsageError(f"image {path} is not a regular file or a block device")
        if not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"image {path} is not writable")
        return False
    if not create:
        raise UsageError(f"image {path} does not exist")
    if size % lba_size:
        raise UsageError(f"size {size} is not a multiple of the LBA size {lba_size}")
    if size < 1 << 20:
        raise UsageError(f"size {size} is too small (at least 1 MiB)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot create image in {parent}: not writable")
    return True
