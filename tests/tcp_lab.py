"""The NVMe/TCP lab: a real Linux nvmet-tcp target in a QEMU guest.

The NVMe over TCP host transport is tested against the kernel's own target
(nvmet + nvmet-tcp), not only against our model: it is the reference
implementation, and its dmesg names every protocol error it sees.  This
machine's kernel has no modules, so the target runs in a small Linux guest
(../shared/docs/NVME-TCP-LAB.md records what was tried and works):

- the guest is built once and cached per kernel package version and digest
  of /init (``INIT`` below) and the module lists, beside the vfio lab's
  cache: Debian's kernel image and busybox-static are fetched with
  ``apt-get download`` and unpacked with ``dpkg -x`` (vfio_lab's helpers);
  the initramfs holds busybox, the target modules, and -- loaded only when
  asked -- the kernel's nvme-tcp host and the virtio/9p modules;
- /init makes two 64 MiB ram disks and two subsystems on one TCP port
  (4420): ``nqn.2024-01.io.nvmefs:test`` (any host) on /dev/ram0 and
  ``nqn.2024-01.io.nvmefs:restricted`` (only
  ``nqn.2024-01.io.nvmefs:allowed-host``) on /dev/ram1, prints a READY
  marker and then serves a command channel on its second serial port;
- ``Target`` boots QEMU (TCG; KVM does not work here) with the guest's 4420
  forwarded to a free port on 127.0.0.1, and offers ``sh()`` (a shell
  command in the guest), ``console()``/``dmesg()``, ``drop_port()`` /
  ``restore_port()`` (kill the test subsystem's connections, let new ones
  in again) and ``kernel_fio()`` (the guest kernel's own nvme-tcp host on
  its own target, measured with the host's fio over a read-only 9p share of
  the host root, for benchmark ratios);
- ``nvmet_target`` is a session-wide pytest fixture: a TCG boot costs
  ~7 s here (vmlinux through PVH, -nodefaults, no boot-time printk; more on
  a loaded machine, 12 s with two guests booting at once), so every test of
  a session shares one guest.

Command line: ``python tests/tcp_lab.py build`` (build/cache only),
``serve`` (boot, print the address, run until Ctrl-C), ``check`` (boot and
self-check: ICReq/ICResp, Fabrics Connect, host restriction, drop_port /
restore_port, with timings).
"""
import atexit
import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:            # imported from elsewhere than tests/
    sys.path.insert(0, HERE)
import vfio_lab                     # noqa: E402  (its package fetch/unpack helpers)
from vfio_lab import LabError, LabUnavailable  # noqa: E402,F401  (re-exported for tests)

try:
    import pytest
except ImportError:                 # `python tests/tcp_lab.py` outside the venv
    pytest = None

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")   # as conftest.CI

SUBNQN = "nqn.2024-01.io.nvmefs:test"
RESTRICTED_NQN = "nqn.2024-01.io.nvmefs:restricted"
ALLOWED_HOSTNQN = "nqn.2024-01.io.nvmefs:allowed-host"
GUEST_PORT = 4420
RAMDISK_SIZE = 64 << 20             # each namespace: brd rd_size is in KiB
READY, FAILED = "TCP-LAB-READY", "TCP-LAB-FAILED"
BOOT_TIMEOUT = 180

# insmod order matters: each needs the ones before it (modinfo depends= of
# Debian's 6.1 package).  These are loaded at boot.
TARGET_MODULES = ("crct10dif_common configfs crc64 crct10dif-pclmul crct10dif_generic crc-t10dif "
                  "crc64-rocksoft t10-pi crc32c_generic crc32c-intel libcrc32c nvmet nvmet-tcp "
                  "e1000 brd").split()
# Loaded only by kernel_fio(): the kernel's NVMe/TCP host (a baseline for
# benchmarks), and what mounting the host root over virtio-9p needs (as in
# vfio_lab.MODULES).  Missing host modules only disable kernel_fio().
HOST_MODULES = "nvme-core nvme-fabrics nvme-tcp".split()
NINEP_MODULES = ("virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci "
                 "netfs fscache 9pnet 9pnet_virtio 9p").split()

INIT = r"""#!/bin/busybox sh
# nvmefs tcp-lab /init: an nvmet-tcp target, then a command channel on ttyS1.
/bin/busybox mkdir -p /proc /sys /dev /tmp /host
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
say() { echo "[tcp-lab $(cut -d' ' -f1 /proc/uptime)] $*"; }
ok=1
fail() { say "FAILED: $*"; ok=0; }
put() { echo -n "$2" > "$1" || fail "echo $2 > $1"; }
mk() { mkdir "$1" || fail "mkdir $1"; }
lnk() { ln -s "$1" "$2" || fail "ln -s $1 $2"; }

for m in $(cat /modules.target); do
  case $m in
    brd) insmod /modules/brd.ko rd_nr=2 rd_size=@RD_KIB@ || fail "insmod brd";;
    *) insmod /modules/$m.ko || fail "insmod $m";;
  esac
done
mount -t configfs configfs /sys/kernel/config || fail "mount configfs"

ip link set lo up
ip link set eth0 up || fail "no eth0"
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

N=/sys/kernel/config/nvmet
T=$N/subsystems/@SUBNQN@
R=$N/subsystems/@RESTRICTED@
mk $T; put $T/attr_allow_any_host 1
mk $T/namespaces/1; put $T/namespaces/1/device_path /dev/ram0; put $T/namespaces/1/enable 1
mk $R; put $R/attr_allow_any_host 0
mk $R/namespaces/1; put $R/namespaces/1/device_path /dev/ram1; put $R/namespaces/1/enable 1
mk $N/hosts/@ALLOWED@
lnk $N/hosts/@ALLOWED@ $R/allowed_hosts/@ALLOWED@
P=$N/ports/1
mk $P
put $P/addr_trtype tcp; put $P/addr_adrfam ipv4
put $P/addr_traddr 0.0.0.0; put $P/addr_trsvcid @PORT@
lnk $T $P/subsystems/@SUBNQN@
lnk $R $P/subsystems/@RESTRICTED@

# e1000 reports its link a few seconds after "up" (hence waited for only
# now); until then slirp's forwarded connections stall: the first ICReq
# took ~6 s without this wait
i=0
while [ "$(cat /sys/class/net/eth0/carrier 2>/dev/null)" != 1 ]; do
  i=$((i + 1)); [ $i -gt 300 ] && { fail "eth0 has no carrier"; break; }
  sleep 0.1
done
# one packet out so slirp learns the guest's MAC: else its first forwarded
# connection waits on ARP (~0.5 s)
ping -c 1 -W 2 10.0.2.2 > /dev/null 2>&1

# boot quietly (loglevel=4: printk to the serial console is slow under TCG),
# then let nvmet's pr_info lines (controller created/deleted...) through
dmesg -n 7
stty -F /dev/ttyS1 raw -echo 115200 || fail "stty ttyS1"
if [ $ok = 1 ]; then say "@READY@"; else say "@FAILED@"; fi

# The command channel, one request a line: "<id> <timeout s> <base64 script>";
# the reply: "@@TCPLAB-BEGIN <id>@@", the base64 of its stdout+stderr,
# "@@TCPLAB-END <id> <status>@@".  base64 both ways: scripts may hold any
# byte and any number of lines, and output can never forge the end marker.
serve() {
  while read -r id tmo b64; do
    [ -n "$b64" ] || continue
    echo "$b64" | base64 -d > /tmp/ctl.sh
    timeout -s KILL "$tmo" sh /tmp/ctl.sh < /dev/null > /tmp/ctl.out 2>&1
    rc=$?
    printf '\n@@TCPLAB-BEGIN %s@@\n' "$id"
    base64 /tmp/ctl.out
    printf '@@TCPLAB-END %s %d@@\n' "$id" "$rc"
  done < /dev/ttyS1 > /dev/ttyS1 2>&1
}
while true; do serve; say "command channel ended, restarting"; sleep 1; done
"""


def _init_text():
    subst = {"@SUBNQN@": SUBNQN, "@RESTRICTED@": RESTRICTED_NQN, "@ALLOWED@": ALLOWED_HOSTNQN,
             "@PORT@": str(GUEST_PORT), "@RD_KIB@": str(RAMDISK_SIZE >> 10),
             "@READY@": READY, "@FAILED@": FAILED}
    text = INIT
    for k, v in subst.items():
        text = text.replace(k, v)
    return text


def _digest():
    return hashlib.sha256(" ".join([_init_text(), *TARGET_MODULES, "|", *HOST_MODULES, "|",
                                    *NINEP_MODULES]).encode()).hexdigest()[:12]


def build_guest(log=print):
    """Build (or find cached) vmlinux + initramfs with vfio_lab's recipe, our
    /init and modules, in a cache directory of our own.  Returns their paths."""
    def populate(ird, find, pkg):
        missing = [m for m in TARGET_MODULES + NINEP_MODULES if find(m) is None]
        if missing:
            raise LabError(f"{pkg} has no module(s) {' '.join(m + '.ko' for m in missing)}")
        host = [m for m in HOST_MODULES if find(m)]
        if len(host) != len(HOST_MODULES):
            log(f"tcp-lab: {pkg} lacks the nvme-tcp host modules: kernel_fio() unavailable")
            host = []
        for m in TARGET_MODULES + NINEP_MODULES + host:
            shutil.copy2(find(m), os.path.join(ird, "modules", m + ".ko"))
        for name, lst in (("target", TARGET_MODULES), ("host", host), ("9p", NINEP_MODULES)):
            with open(os.path.join(ird, f"modules.{name}"), "w") as f:
                f.write("\n".join(lst) + "\n")
        return _init_text()
    return vfio_lab.build_cached_guest("tcp-lab", "tcp-", _digest(), populate, log)


def free_port():
    """A TCP port free on 127.0.0.1 now.  QEMU binds it a moment later, so a
    race with another process is possible: Target.start retries on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:                                # resolved now: preexec_fn runs between fork and exec
    import ctypes
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent():
    """In QEMU's child before exec: SIGKILL it when its parent dies, so a
    killed test run (SIGKILL skips atexit) leaves no guest spinning forever.
    Only used when started from the main thread: the signal comes when the
    forking *thread* ends, and a worker thread may end long before the run."""
    _prctl(1, 9)                    # PR_SET_PDEATHSIG, SIGKILL


class _Channel:
    """The host end of the guest's command channel (QEMU's unix socket on the
    guest's ttyS1).  One request at a time; a reader thread collects bytes so
    the guest's writes never stall on a full socket buffer."""

    MARK = re.compile(rb"@@TCPLAB-BEGIN (\d+)@@\n(.*?)@@TCPLAB-END \1 (\d+)@@\n", re.S)

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.closed = False
        self.cond = threading.Condition()
        self.lock = threading.Lock()          # one request in flight
        self.next_id = 1
        threading.Thread(target=self._reader, daemon=True, name="tcp-lab-ctl").start()

    def _reader(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.closed = True
                    self.cond.notify_all()
                    return
                self.buf += data
                self.cond.notify_all()

    def run(self, script, timeout):
        with self.lock:
            rid, self.next_id = self.next_id, self.next_id + 1
            b64 = base64.b64encode(script.encode()).decode()
            # the guest kills the script after `timeout`; the host waits a
            # little longer for the reply to cross the (slow, TCG) serial line
            self.sock.sendall(f"{rid} {max(1, int(timeout + 0.999))} {b64}\n".encode())
            deadline = time.monotonic() + timeout + 30 + len(b64) / 2000
            with self.cond:
                while True:
                    for m in self.MARK.finditer(self.buf):
                        if int(m.group(1)) == rid:
                            self.buf = self.buf[m.end():]   # older replies: late, dropped
                            out = base64.b64decode(b"".join(m.group(2).split()))
                            return int(m.group(3)), out.decode("utf-8", "replace")
                    left = deadline - time.monotonic()
                    if self.closed or left <= 0:
                        raise LabError("tcp-lab: no reply on the command channel "
                                       f"({'closed' if self.closed else 'timed out'}) for: "
                                       f"{script[:200]}")
                    self.cond.wait(min(left, 1.0))

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Target:
    """A booted guest running nvmet-tcp.  ``with Target() as t: ...``."""

    host = "127.0.0.1"
    subnqn = SUBNQN
    restricted_nqn = RESTRICTED_NQN
    allowed_hostnqn = ALLOWED_HOSTNQN
    namespace_size = RAMDISK_SIZE

    def __init__(self, *, memory=512, smp=2, log=print):
        self.memory, self.smp, self.log = memory, smp, log
        self.proc = None
        self.port = None
        self.tmp = None
        self.chan = None
        self.boot_seconds = None
        self._fio_ready = False

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _argv(self, vmlinux, initrd):
        t = self.tmp
        return ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
                "-m", str(self.memory), "-smp", str(self.smp),
                "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
                "-kernel", vmlinux, "-initrd", initrd,
                "-append", "console=ttyS0 loglevel=4 panic=-1 tsc=reliable",
                # ttyS0: the console, straight into a file (written unbuffered)
                "-chardev", f"file,id=con,path={t}/console.log", "-serial", "chardev:con",
                # ttyS1: the command channel
                "-chardev", f"socket,id=ctl,path={t}/ctl.sock,server=on,wait=off",
                "-device", "isa-serial,chardev=ctl",
                "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:{GUEST_PORT}",
                "-device", "e1000,netdev=n0",
                # the host root, read-only, for kernel_fio (mounted only then)
                "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,"
                           "multidevs=remap"]

    def start(self):
        """Build if needed, boot, wait for READY.  Raises LabUnavailable when
        a host prerequisite is missing, LabError when the guest fails."""
        vmlinux, initrd = build_guest(self.log)
        self.tmp = tempfile.mkdtemp(prefix="nvmefs-tcp-lab-")
        t0 = time.monotonic()
        try:
            for attempt in range(3):
                self.port = free_port()
                self._spawn(vmlinux, initrd)
                try:
                    self._wait_ready(t0 + BOOT_TIMEOUT)
                    break
                except LabError:
                    qlog = vfio_lab._read(os.path.join(self.tmp, "qemu.log"))
                    self._kill()
                    if "hostfwd" in qlog or "host forwarding" in qlog:
                        continue            # lost the port race: another port
                    raise
            else:
                raise LabError("tcp-lab: could not set up the port forwarding three times")
        except BaseException:
            self.stop()                     # the LabError carries the console
            raise
        self.boot_seconds = time.monotonic() - t0
        return self

    def _spawn(self, vmlinux, initrd):
        for f in ("console.log", "ctl.sock"):
            try:
                os.unlink(os.path.join(self.tmp, f))
            except FileNotFoundError:
                pass
        with open(os.path.join(self.tmp, "qemu.log"), "wb") as qlog:
            self.proc = subprocess.Popen(self._argv(vmlinux, initrd), stdin=subprocess.DEVNULL,
                                         stdout=qlog, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent if _prctl and
                                         threading.current_thread() is threading.main_thread()
                                         else None)

    def _wait_ready(self, deadline):
        sock = os.path.join(self.tmp, "ctl.sock")
        while True:
            if self.chan is None and os.path.exists(sock):
                # connect early: QEMU drops what the guest writes to an
                # unconnected chardev socket
                try:
                    self.chan = _Channel(sock)
                except OSError:         # not listening yet, or QEMU gone (below)
                    pass
            con = self.console()
            if re.search(rf"\] {READY}\b", con) and self.chan is not None:
                return
            if FAILED in con:
                raise LabError("tcp-lab: the guest could not set up the target", con)
            if self.proc.poll() is not None:
                raise LabError(f"tcp-lab: QEMU exited with status {self.proc.returncode}: "
                               + vfio_lab._read(os.path.join(self.tmp, "qemu.log"))[-2000:],
                               con)
            if time.monotonic() > deadline:
                raise LabError(f"tcp-lab: guest not ready within {BOOT_TIMEOUT} s", con)
            time.sleep(0.2)

    def _kill(self):
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self):
        """Kill QEMU (the guest holds nothing worth a clean shutdown) and
        remove the temp dir."""
        self._kill()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    # -- inspection --------------------------------------------------------

    def console(self):
        """The guest console so far (kernel log at loglevel 7 after boot:
        nvmet's controller and protocol-error messages land here)."""
        return vfio_lab._read(os.path.join(self.tmp, "console.log")) if self.tmp else ""

    def sh(self, cmd, timeout=60):
        """Run ``cmd`` with the guest's busybox sh.  Returns (status, output:
        stdout and stderr together).  The guest kills it after ``timeout``
        seconds (status 137)."""
        if not self.alive() or self.chan is None:
            raise LabError("tcp-lab: the guest is not running", self.console())
        return self.chan.run(cmd, timeout)

    def check(self, cmd, timeout=60):
        """sh() that raises unless the status is 0; returns the output."""
        status, out = self.sh(cmd, timeout)
        if status:
            raise LabError(f"tcp-lab: guest command failed ({status}): {cmd}\n{out}")
        return out

    def dmesg(self):
        return self.check("dmesg")

    # -- the test subsystem's port link ------------------------------------

    _link = f"/sys/kernel/config/nvmet/ports/1/subsystems/{SUBNQN}"

    def drop_port(self):
        """Unlink the test subsystem from port 1.  nvmet then deletes every
        controller of that subsystem on the port, so connected queues are
        closed; new Connects to it fail until restore_port().  The TCP
        listener stays (the restricted subsystem is still linked), so a TCP
        connect and ICReq still succeed -- only queues that reached a
        controller (Fabrics Connect) are cut.  See `check` for the proof."""
        self.check(f"[ ! -L {self._link} ] || rm {self._link}")

    def restore_port(self):
        """Link the test subsystem to port 1 again (a no-op when linked)."""
        self.check(f"[ -L {self._link} ] || "
                   f"ln -s /sys/kernel/config/nvmet/subsystems/{SUBNQN} {self._link}")

    # -- the kernel's own host, for benchmarks -----------------------------

    def _prepare_fio(self):
        """Load the 9p and nvme-tcp host modules and mount the host root at
        /host (read-only, as in vfio_lab), once."""
        if self._fio_ready:
            return
        script = r"""
            set -e
            [ -s /modules.host ] || { echo "no nvme-tcp host modules in this guest"; exit 3; }
            for m in $(cat /modules.9p) $(cat /modules.host); do
              grep -q "^$(echo $m | tr - _) " /proc/modules || insmod /modules/$m.ko
            done
            if ! grep -q ' /host ' /proc/mounts; then
              mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 host /host
              for f in proc sys dev; do mount --bind /$f /host/$f; done
              mount -t tmpfs -o size=64m tmpfs /host/tmp
              mount -t tmpfs -o size=64m tmpfs /host/run
            fi
            chroot /host /usr/bin/env fio --version
        """
        status, out = self.sh(script, timeout=180)
        if status:
            raise LabError(f"tcp-lab: cannot prepare kernel_fio (status {status}):\n{out}")
        self._fio_ready = True

    def guest_run(self, argv, timeout=300, cwd=None):
        """Run a host program inside the guest, chrooted into the host root
        (read-only, with tmpfs /tmp): so that nvmefs reaches the guest's
        target over the guest's own loopback, the path the guest kernel's
        host takes in kernel_fio().  Returns (status, output)."""
        self._prepare_fio()
        cmd = " ".join(shlex.quote(a) for a in argv)
        if cwd:
            cmd = f"cd {shlex.quote(cwd)} && {cmd}"
        return self.sh("chroot /host /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp "
                       f"sh -c {shlex.quote(cmd)}", timeout=timeout)

    def kernel_fio(self, fio_args, timeout=300):
        """Connect the guest kernel's nvme-tcp host to the guest's own target
        (127.0.0.1:4420, the test subsystem), run the host's fio on the block
        device it makes (``--filename`` and ``--output-format=json`` are
        added), disconnect, and return fio's parsed JSON.  For benchmark
        ratios only: both ends share the same two TCG CPUs."""
        self._prepare_fio()
        # the device: write the options to /dev/nvme-fabrics and read back
        # "instance=N,cntlid=M" on the same open file
        status, out = self.sh(rf"""
            exec 3<>/dev/nvme-fabrics
            echo "transport=tcp,traddr=127.0.0.1,trsvcid={GUEST_PORT},nqn={SUBNQN}" >&3 || exit 1
            read -r line <&3; exec 3<&-
            echo "$line"
            inst=$(echo "$line" | sed -n 's/.*instance=\([0-9]*\).*/\1/p')
            for i in $(seq 100); do
              for b in /sys/class/nvme/nvme$inst/nvme*n*; do
                [ -e "$b" ] || continue
                n=${{b##*/}}
                # with native multipath the controller's path node is
                # nvmeXcYnZ, the block device its head nvmeXnZ
                n=$(echo $n | sed 's/^nvme\([0-9]*\)c[0-9]*n/nvme\1n/')
                [ -b /dev/$n ] && {{ echo "dev=/dev/$n"; exit 0; }}
              done
              sleep 0.1
            done
            echo "no block device for controller nvme$inst"; ls /sys/class/nvme/nvme$inst; exit 2
        """, timeout=60)
        inst = re.search(r"instance=(\d+)", out)
        dev = re.search(r"^dev=(\S+)", out, re.M)
        try:
            if status or not dev:
                raise LabError(f"tcp-lab: the guest's kernel host did not connect ({status}):\n"
                               f"{out}", self.console()[-4000:])
            args = " ".join(shlex.quote(a) for a in fio_args)
            status, out = self.sh(
                "chroot /host /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp "
                f"fio --output-format=json --output=/tmp/fio.json --filename={dev.group(1)} "
                f"{args}", timeout=timeout)
            if status:
                raise LabError(f"tcp-lab: fio failed ({status}):\n{out}")
            return json.loads(self.check("cat /host/tmp/fio.json; rm -f /host/tmp/fio.json"))
        finally:
            if inst:
                self.sh(f"echo 1 > /sys/class/nvme/nvme{inst.group(1)}/delete_controller")


# -- a minimal NVMe/TCP host, for the self-check and for tests ------------

def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def icreq(sock, hpda=0, digest=0, maxr2t=0):
    """Send an ICReq, read the ICResp: returns its fields (NVMe/TCP 3.6.2)."""
    pdu = struct.pack("<BBBBIHBBI", 0x00, 0, 128, 0, 128, 0, hpda, digest, maxr2t)
    sock.sendall(pdu.ljust(128, b"\0"))
    r = recv_exact(sock, 128)
    typ, flags, hlen, pdo, plen, pfv, cpda, dgst, maxh2c = struct.unpack_from("<BBBBIHBBI", r)
    return dict(type=typ, flags=flags, hlen=hlen, pdo=pdo, plen=plen, pfv=pfv, cpda=cpda,
                digest=dgst, maxh2cdata=maxh2c)


def fabrics_connect(sock, subnqn, hostnqn, *, qid=0, sqsize=31, kato=0, cid=1, cntlid=0xFFFF,
                    hostid=None):
    """Send a Fabrics Connect (in-capsule data, no digests, after icreq) and
    read its CapsuleResp.  Returns (status field without the phase bit,
    dw0: the controller ID on success)."""
    sqe = struct.pack("<BBHB19xQIxxxBHHHBxI12x", 0x7F, 0x40, cid, 0x01,
                      0, 1024, 0x01,            # SGL: data block, offset 0 in the capsule
                      0, qid, sqsize, 0, kato)
    data = struct.pack("<16sH238x256s256s256x", (hostid or uuid.uuid4()).bytes, cntlid,
                       subnqn.encode(), hostnqn.encode())
    hdr = struct.pack("<BBBBI", 0x04, 0, 72, 72, 72 + len(data))
    sock.sendall(hdr + sqe + data)
    typ, _, hlen, _, plen = struct.unpack("<BBBBI", recv_exact(sock, 8))
    body = recv_exact(sock, plen - 8)
    if typ != 0x05:
        raise ConnectionError(f"expected a CapsuleResp (0x05), got PDU type {typ:#x}")
    dw0, _, sqhd, sqid, rcid, status = struct.unpack_from("<IIHHHH", body)
    return status >> 1, dw0


def connect_queue(target, subnqn=None, hostnqn="nqn.2024-01.io.nvmefs:tcp-lab-check", timeout=30):
    """TCP connect + ICReq + admin Connect; returns (socket, status, dw0)."""
    s = socket.create_connection((target.host, target.port), timeout=timeout)
    icreq(s)
    status, dw0 = fabrics_connect(s, subnqn or target.subnqn, hostnqn)
    return s, status, dw0


def wait_closed(sock, timeout):
    """True when the peer closes (EOF or reset) within ``timeout`` s."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


# -- pytest ---------------------------------------------------------------

_session = {}


def session_target():
    """The one Target of this process, booted on first use and killed at
    exit.  A module-level cache, not only the fixture's scope: a fixture
    imported into several test modules gets one definition per module, and
    each would boot its own guest."""
    t = _session.get("target")
    if t is None:
        if "error" in _session:
            raise _session["error"]
        try:
            t = Target(log=lambda m: None).start()
        except Exception as exc:
            _session["error"] = exc
            raise
        _session["target"] = t
        atexit.register(t.stop)
    if not t.alive():
        raise LabError("tcp-lab: the session's guest died", t.console())
    return t


if pytest is not None:
    @pytest.fixture(scope="session")
    def nvmet_target():
        """A booted nvmet-tcp target shared by the whole session.  A missing
        host prerequisite skips, or fails under CI."""
        try:
            yield session_target()
        except LabUnavailable as exc:
            if CI:
                pytest.fail(f"prerequisite missing under CI: tcp lab: {exc}")
            pytest.skip(f"prerequisite missing: tcp lab: {exc}")


# -- command line ---------------------------------------------------------

def self_check(t):
    def step(what, fn):
        t0 = time.monotonic()
        res = fn()
        print(f"  {time.monotonic() - t0:7.3f} s  {what}: {res}")
        return res

    print(f"tcp-lab: booted in {t.boot_seconds:.1f} s, port {t.port}")
    step("guest uname -r", lambda: t.check("uname -r").strip())
    step("guest subsystems on port 1",
         lambda: t.check("ls /sys/kernel/config/nvmet/ports/1/subsystems").split())

    def ic():
        with socket.create_connection((t.host, t.port), timeout=30) as s:
            return icreq(s)
    r = step("ICReq -> ICResp", ic)
    assert (r["type"], r["hlen"], r["plen"]) == (0x01, 128, 128), r

    def connect(subnqn, hostnqn):
        s, status, dw0 = connect_queue(t, subnqn, hostnqn)
        s.close()
        return f"status {status:#x} cntlid {dw0 & 0xffff}"
    ok = step("Connect test subsystem", lambda: connect(t.subnqn, "nqn.2024-01.io.nvmefs:any"))
    assert ok.startswith("status 0x0 "), ok
    bad = step("Connect restricted, other host",
               lambda: connect(t.restricted_nqn, "nqn.2024-01.io.nvmefs:other"))
    assert not bad.startswith("status 0x0 "), bad
    ok = step("Connect restricted, allowed host",
              lambda: connect(t.restricted_nqn, t.allowed_hostnqn))
    assert ok.startswith("status 0x0 "), ok

    live, status, _ = connect_queue(t)
    assert status == 0
    idle = socket.create_connection((t.host, t.port), timeout=30)
    icreq(idle)                      # a queue that never sent Connect
    other, status, _ = connect_queue(t, t.restricted_nqn, t.allowed_hostnqn)
    assert status == 0
    step("drop_port", t.drop_port)
    cut = step("connected queue (test subsystem) closed within 10 s",
               lambda: wait_closed(live, 10))
    step("ICReq-only queue closed within 2 s", lambda: wait_closed(idle, 2))
    step("restricted subsystem's queue closed within 2 s", lambda: wait_closed(other, 2))
    refused = step("Connect while dropped",
                   lambda: connect(t.subnqn, "nqn.2024-01.io.nvmefs:any"))
    step("restore_port", t.restore_port)
    again = step("Connect after restore", lambda: connect(t.subnqn, "nqn.2024-01.io.nvmefs:any"))
    for s in (live, idle, other):
        s.close()
    assert cut, "drop_port did not close a connected queue"
    assert not refused.startswith("status 0x0 "), refused
    assert again.startswith("status 0x0 "), again
    print("  nvmet on the console:")
    for line in t.console().splitlines():
        if "nvmet" in line:
            print("    " + line.strip())
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argv.pop(0) if argv else "build"
    if what == "build":
        print(*build_guest())
        return 0
    if what not in ("serve", "check", "fio"):
        print(__doc__)
        return 2
    with Target() as t:
        if what == "serve":
            print(f"port={t.port} subnqn={t.subnqn} restricted={t.restricted_nqn} "
                  f"allowed_hostnqn={t.allowed_hostnqn} host={t.host} (booted in "
                  f"{t.boot_seconds:.1f} s; console {t.tmp}/console.log)", flush=True)
            try:
                while t.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
            return 0
        if what == "fio":
            args = argv or ["--name=rr", "--rw=randread", "--bs=4k", "--iodepth=1",
                            "--ioengine=psync", "--direct=1", "--runtime=5", "--time_based"]
            t0 = time.monotonic()
            res = t.kernel_fio(args)
            job = res["jobs"][0]
            print(f"kernel_fio {' '.join(args)}: read iops {job['read']['iops']:.0f} "
                  f"write iops {job['write']['iops']:.0f} ({time.monotonic() - t0:.1f} s)")
            return 0
        return self_check(t)


if __name__ == "__main__":
    sys.exit(main())
