"""The VFIO lab: a QEMU guest with an emulated IOMMU and QEMU's NVMe controller.

No machine here has an NVMe device or vfio in its own kernel, so the VFIO
transport is tested inside a small Linux guest (../shared/docs/VFIO-LAB.md
records what was tried and works):

- the guest is built once and cached per kernel package version: Debian's
  kernel image and busybox-static are fetched with ``apt-get download`` and
  unpacked with ``dpkg -x``; the xz payload of vmlinuz is unpacked to the ELF
  vmlinux (PVH entry, boots ~4 s faster under TCG); the initramfs holds
  busybox, the virtio/9p/vfio modules and our /init (``INIT`` below);
- each run boots QEMU (TCG, q35, intel-iommu with interrupt remapping, one
  NVMe controller with a 512 B and a 4 KiB namespace on sparse raw images),
  shares the host root read-only and a scratch directory writable over 9p,
  and runs one command chrooted into the host root, so the project's venv
  and the in-place built extension run unchanged.

``run(argv)`` returns a ``LabResult`` (status, console log, scratch dir).
Command line: ``python tests/vfio_lab.py build`` / ``python tests/vfio_lab.py
run -- CMD...`` / ``python tests/vfio_lab.py pytest [ARGS...]``.
"""
import dataclasses
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
QEMU = "qemu-system-x86_64"
HOST_TOOLS = {QEMU: "qemu-system-x86", "dpkg": "dpkg", "apt-get": "apt", "cpio": "cpio"}

# insmod order matters: each needs the ones before it.  nvme.ko stays out so
# the controller is left unbound for vfio-pci.  fuse is for `nvmefs mount`.
MODULES = ("virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci "
           "netfs fscache 9pnet 9pnet_virtio 9p irqbypass vfio vfio_iommu_type1 vfio_virqfd "
           "vfio-pci-core vfio-pci fuse").split()

# The namespaces of the guest's controller: (size, logical block size).
NAMESPACES = ((64 << 20, 512), (64 << 20, 4096))
NVME_BDF = "0000:00:03.0"        # first PCI slot after the q35 host bridge with -nodefaults

INIT = r"""#!/bin/busybox sh
# nvmefs vfio-lab /init.  Kernel command line: lab_rw=DIR (host dir shared
# writable, mounted at the same path), then "-- CMD ARGS" to run chrooted into
# the host root.  Prints LAB_EXIT=<status> and powers off.
/bin/busybox mkdir -p /proc /sys /dev /host
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "[lab $(cut -d' ' -f1 /proc/uptime)] $*"; }

rw=
for a in $(cat /proc/cmdline); do
  case "$a" in lab_rw=*) rw=${a#lab_rw=};; esac
done

for m in $(cat /modules.order); do
  insmod /modules/$m.ko || say "insmod $m failed"
done

mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 host /host \
  || say "cannot mount the host root"
[ -n "$rw" ] && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 rw "/host$rw" \
  || say "cannot mount the scratch share $rw"

# every NVMe function (class 0x010802) goes to vfio-pci
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/class)" = 0x010802 ] || continue
  bdf=${d##*/}
  [ -e $d/driver ] && echo $bdf > $d/driver/unbind
  echo vfio-pci > $d/driver_override
  echo $bdf > /sys/bus/pci/drivers_probe
  g=$(readlink $d/iommu_group)
  say "nvme $bdf -> $(basename "$(readlink $d/driver)") group ${g##*/}"
done

for f in proc sys dev; do mount --bind /$f /host/$f; done
mount -t tmpfs -o size=256m tmpfs /host/run
mount -t tmpfs -o size=64m tmpfs /host/dev/shm 2>/dev/null
say "run: $*"
chroot /host /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/run \
  TMPDIR=/run PYTHONDONTWRITEBYTECODE=1 NVMEFS_VFIO_LAB=1 LAB_RW="$rw" "$@"
rc=$?
say "LAB_EXIT=$rc"
sync
poweroff -f
"""


class LabUnavailable(Exception):
    """A host prerequisite is missing (a skip locally, a failure under CI)."""


class LabError(AssertionError):
    """The guest did not boot, did not finish, or could not be built."""

    def __init__(self, msg, console=""):
        super().__init__(msg + ("\n--- guest console ---\n" + console[-20000:] if console else ""))
        self.console = console


@dataclasses.dataclass
class LabResult:
    status: int
    console: str
    scratch: str
    seconds: float


def cache_root():
    base = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(base, "nvmefs-vfio-lab") if base else "/var/tmp/nvmefs-vfio-lab"


def check_host():
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise LabUnavailable("host packages missing: " + " ".join(sorted(set(missing))))


def _sh(*argv, cwd=None):
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise LabUnavailable(f"{' '.join(argv)} failed: {p.stderr.strip()[-500:]}")
    return p.stdout


def kernel_package():
    """The kernel image package linux-image-amd64 depends on, and its version."""
    out = _sh("apt-cache", "depends", "linux-image-amd64")
    m = re.search(r"Depends:\s*(linux-image-\S+-amd64)", out)
    if not m:
        raise LabUnavailable("apt-cache knows no linux-image-amd64 (run apt-get update)")
    pkg = m.group(1)
    pol = _sh("apt-cache", "policy", pkg)
    v = re.search(r"Candidate:\s*(\S+)", pol)
    return pkg, (v.group(1) if v else "unknown")


def extract_vmlinux(vmlinuz, out):
    """vmlinuz -> ELF vmlinux: the payload is an xz stream after the setup code."""
    with open(vmlinuz, "rb") as f:
        data = f.read()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        raise LabError(f"{vmlinuz}: no xz payload found")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
    if elf[:4] != b"\x7fELF":
        raise LabError(f"{vmlinuz}: xz payload is not an ELF image")
    with open(out + ".part", "wb") as f:
        f.write(elf)
    os.replace(out + ".part", out)


def _init_digest():
    return hashlib.sha256((INIT + " ".join(MODULES)).encode()).hexdigest()[:12]


def build_guest(log=print):
    """Build (or find cached) vmlinux + initramfs.  Returns their paths."""
    def populate(ird, find, pkg):
        for m in MODULES:
            if find(m) is None:
                raise LabError(f"{pkg} has no module {m}.ko")
            shutil.copy2(find(m), os.path.join(ird, "modules", m + ".ko"))
        with open(os.path.join(ird, "modules.order"), "w") as f:
            f.write("\n".join(MODULES) + "\n")
        return INIT
    return build_cached_guest("vfio-lab", "", _init_digest(), populate, log)


def build_cached_guest(lab, prefix, digest, populate, log=print):
    """The recipe both labs share: Debian's current kernel package and
    busybox-static, unpacked; vmlinuz -> the ELF vmlinux (PVH: boots a few
    seconds faster under TCG); an initramfs with busybox, what
    ``populate(ird, find, pkg)`` puts in ``ird/modules`` (``find(name)``: a
    module's path in the package, - and _ alike, or None) and the /init text
    it returns.  Cached under cache_root() by package version and
    ``digest``; returns (vmlinux, initramfs) paths."""
    check_host()
    pkg, version = kernel_package()
    key = f"{prefix}{pkg}_{version}_{digest}".replace(":", "_")
    d = os.path.join(cache_root(), key)
    vmlinux, initrd = os.path.join(d, "vmlinux"), os.path.join(d, "initramfs.cpio.gz")
    if os.path.exists(vmlinux) and os.path.exists(initrd):
        return vmlinux, initrd
    t0 = time.monotonic()
    os.makedirs(cache_root(), exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"build-{prefix}", dir=cache_root())
    try:
        log(f"{lab}: building the guest from {pkg} {version} in {d}")
        _sh("apt-get", "download", "-q", pkg, "busybox-static", cwd=work)
        root = os.path.join(work, "x")
        for deb in os.listdir(work):
            if deb.endswith(".deb"):
                _sh("dpkg", "-x", os.path.join(work, deb), root)
        kver = pkg[len("linux-image-"):]
        boot = os.path.join(root, "boot", f"vmlinuz-{kver}")
        if not os.path.exists(boot):
            raise LabError(f"{pkg} holds no /boot/vmlinuz-{kver}")
        extract_vmlinux(boot, os.path.join(work, "vmlinux"))

        ird = os.path.join(work, "initramfs")
        os.makedirs(os.path.join(ird, "bin"))
        os.makedirs(os.path.join(ird, "modules"))
        shutil.copy2(os.path.join(root, "bin", "busybox"), os.path.join(ird, "bin", "busybox"))
        mods = {}
        for dirpath, _, files in os.walk(os.path.join(root, "lib", "modules", kver)):
            for f in files:
                if f.endswith(".ko"):
                    mods[f[:-3]] = os.path.join(dirpath, f)

        def find(m):
            return mods.get(m) or mods.get(m.replace("-", "_")) or mods.get(m.replace("_", "-"))
        init = populate(ird, find, pkg)
        with open(os.path.join(ird, "init"), "w") as f:
            f.write(init)
        os.chmod(os.path.join(ird, "init"), 0o755)
        pack_initramfs(ird, os.path.join(work, "initramfs.cpio.gz"))

        os.makedirs(d, exist_ok=True)
        os.replace(os.path.join(work, "initramfs.cpio.gz"), initrd)
        os.replace(os.path.join(work, "vmlinux"), vmlinux)
        log(f"{lab}: guest built in {time.monotonic() - t0:.1f} s")
        return vmlinux, initrd
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pack_initramfs(root, dest):
    """The tree at ``root`` as a gzipped newc cpio archive at ``dest``
    (owned by root: the guest's busybox runs as uid 0)."""
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                          input=names.encode(), capture_output=True, check=True).stdout
    with gzip.open(dest, "wb", compresslevel=1) as f:
        f.write(cpio)


def qemu_argv(vmlinux, initrd, scratch, argv, *, memory=1024, namespaces=NAMESPACES, nvme_opts=""):
    cmd = [QEMU, "-accel", "tcg", "-M", "q35", "-smp", "1", "-m", str(memory), "-cpu", "max",
           "-device", "intel-iommu,intremap=on", "-nodefaults", "-display", "none",
           "-serial", "stdio", "-monitor", "none", "-no-reboot",
           "-kernel", vmlinux, "-initrd", initrd,
           "-append", "console=ttyS0 loglevel=4 panic=-1 tsc=reliable intel_iommu=on iommu=pt "
                      f"lab_rw={scratch} -- " + " ".join(argv),
           "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
           "-virtfs", f"local,path={scratch},mount_tag=rw,security_model=none,multidevs=remap",
           "-device", "nvme,id=nvme0,serial=nvmefs-lab,mdts=10" + nvme_opts]
    for i, (size, lbs) in enumerate(namespaces, 1):
        img = os.path.join(scratch, f"ns{i}.img")
        with open(img, "wb") as f:
            f.truncate(size)
        # discard=unmap: QEMU reports DLFEAT "deallocated reads zeroes" but
        # ignores discards on the image by default
        cmd += ["-drive", f"file={img},if=none,id=ns{i},format=raw,discard=unmap",
                "-device", f"nvme-ns,drive=ns{i},bus=nvme0,nsid={i},"
                           f"logical_block_size={lbs},physical_block_size={lbs}"]
    return cmd


def run(argv, *, timeout=240, scratch=None, log=print, **qemu_kw):
    """Boot the guest and run ``argv`` (no spaces in any argument: the kernel
    command line carries it; pass a script for anything complex)."""
    if any(not a or re.search(r"\s", a) for a in argv):
        raise ValueError("guest argv items must be non-empty and without whitespace: use a script")
    vmlinux, initrd = build_guest(log)
    scratch = scratch or tempfile.mkdtemp(prefix="nvmefs-vfio-lab-")
    cmd = qemu_argv(vmlinux, initrd, scratch, argv, **qemu_kw)
    console_path = os.path.join(scratch, "console.log")
    t0 = time.monotonic()
    with open(console_path, "wb") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise LabError(f"vfio-lab: guest did not finish within {timeout} s",
                           _read(console_path)) from None
    seconds = time.monotonic() - t0
    console = _read(console_path)
    m = re.search(r"LAB_EXIT=(\d+)", console)
    if m is None:
        raise LabError(f"vfio-lab: guest ended (qemu status {p.returncode}) without reporting "
                       "an exit status", console)
    return LabResult(int(m.group(1)), console, scratch, seconds)


def run_script(text, **kw):
    """Run a shell script (sh, inside the chroot) in the guest."""
    scratch = kw.pop("scratch", None) or tempfile.mkdtemp(prefix="nvmefs-vfio-lab-")
    path = os.path.join(scratch, "guest.sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + text)
    os.chmod(path, 0o755)
    return run(["/bin/sh", path], scratch=scratch, **kw)


GUEST_PYTEST_PLUGINS = ("pytest_trio.plugin", "pytest_timeout")


def prewarm(python, args):
    """Compile on the host what the guest imports: the guest's root is
    read-only, and compiling (and pytest's assertion rewriting) under TCG
    costs seconds per module.  Collection imports everything the tests do."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--co", *args],
                   cwd=REPO, env=env, capture_output=True, timeout=120)


def run_pytest(args, **kw):
    """Run pytest with the project's venv inside the guest (plugins named
    explicitly: scanning every installed distribution for entry points
    takes ~10 s under TCG); junit XML lands in the scratch dir."""
    python = os.path.join(REPO, ".venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable
    prewarm(python, args)
    plugins = " ".join(f"-p {p}" for p in GUEST_PYTEST_PLUGINS)
    script = (f"cd {shlex.quote(REPO)} || exit 99\n"
              f"export PYTHONPATH={shlex.quote(REPO)} PYTEST_DISABLE_PLUGIN_AUTOLOAD=1\n"
              f"echo \"[guest] python start $(cut -d' ' -f1 /proc/uptime)\"\n"
              f"exec {shlex.quote(python)} -m pytest {plugins} -p no:cacheprovider -o addopts= -rA "
              f"--color=no --junitxml=\"$LAB_RW/junit.xml\" {' '.join(shlex.quote(a) for a in args)}\n")
    return run_script(script, **kw)


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argv.pop(0) if argv else "build"
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if what == "build":
        print(*build_guest())
        return 0
    res = run_pytest(argv) if what == "pytest" else run(argv)
    sys.stdout.write(res.console)
    print(f"\nvfio-lab: status {res.status} in {res.seconds:.1f} s, scratch {res.scratch}")
    return res.status


if __name__ == "__main__":
    sys.exit(main())
