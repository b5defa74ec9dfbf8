"""`nvmefs mount`: bring a controller up and serve its namespaces through FUSE.

Everything that can be checked is checked before anything is created or
mounted, so bad input exits with one line and leaves the image untouched.

The data path is the lanes' (nvmefs/lanes.py): one per CPU, each with its
own FUSE channel and NVMe queue pair.  pyfuse3 serves the rest in trio,
fed by the lanes through the FUSE shim (nvmefs/fuseshim.py).

Ending, in order: the mount goes away (`fusermount3 -u`; or on SIGINT,
SIGTERM, SIGHUP a lazy unmount, which lets files still open be served
until they close, for up to SHUTDOWN_GRACE seconds), the lanes stop taking
requests and answer every one they took, pyfuse3 answers what it holds,
then the controller flushes and shuts down, and the process exits 0.
Signals during that are logged and ignored, so the image is never left
half-written.
"""
import ctypes
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys

from nvmefs import fuseshim  # noqa: F401  (before pyfuse3 binds libfuse)
import pyfuse3
import trio

from nvmefs.errors import ConnectFailed, UsageError, os_text, unwrap
from nvmefs.image import check_image, create_image, default_image
from nvmefs.mounts import fuse_mounts

log = logging.getLogger("nvmefs.mount")

SHUTDOWN_GRACE = 30.0
MNT_DETACH = 2
URING_PARAM = "/sys/module/fuse/parameters/enable_uring"
# --page-cache: the share of the system's dirty-page threshold this mount's
# written-back pages may hold.  FUSE gives a mount 1% and holds writers to
# it (strictlimit): with less free memory (images on /dev/shm) buffered 4 KiB
# writes waited for writeback, 65-71k IOPS; at 10%, 166-175k
DIRTY_SHARE = 10


def read_enable_uring():
    """The fuse module's enable_uring parameter: True, False, or None when
    this kernel has no FUSE over io_uring."""
    try:
        with open(URING_PARAM) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return None


def pick_fuse_transport(args):
    """'uring' or 'dev' for --fuse-transport auto|uring|dev (and
    --enable-uring), with the line that says why when it is not io_uring."""
    if args.enable_uring:
        if args.fuse_transport == "dev":
            raise UsageError("--enable-uring with --fuse-transport dev: pick one")
        if read_enable_uring() is None:
            raise UsageError("--enable-uring: this kernel has no FUSE over io_uring (Linux 6.14 or later, "
                             "CONFIG_FUSE_IO_URING)")
        if not read_enable_uring():
            if os.geteuid() != 0:
                raise UsageError(f"--enable-uring needs root (it writes Y to {URING_PARAM})")
            with open(URING_PARAM, "w") as f:
                f.write("Y")
            print(f"nvmefs: FUSE over io_uring switched on ({URING_PARAM} = Y); it stays on, for every "
                  f"FUSE mount, until set back to N", flush=True)
    if args.fuse_transport == "dev":
        return "dev", None
    on = read_enable_uring()
    if on:
        return "uring", None
    why = ("this kernel has no FUSE over io_uring" if on is None else
           f"FUSE over io_uring is off in this kernel ({URING_PARAM} = N; --enable-uring turns it on)")
    if args.fuse_transport == "uring":
        raise UsageError(f"--fuse-transport uring: {why}")
    return "dev", why


def check_mountpoint(path):
    if not os.path.exists(path):
        raise UsageError(f"mountpoint {path} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise UsageError(f"mountpoint {path} is busy: something is already mounted there")
    if os.listdir(path):
        raise UsageError(f"mountpoint {path} is not empty")


def check_fuse():
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    if not shutil.which("fusermount3"):
        raise UsageError("fusermount3 not found: install the fuse3 package")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise UsageError("no permission on /dev/fuse: run as root or join the group that owns it")


def detach(mountpoint):
    """A lazy unmount (umount -l): no new opens; files still open are served
    until closed, and the connection ends when the last one is."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
            return
        log.warning("lazy unmount of %s: %s", mountpoint, os.strerror(ctypes.get_errno()))
        return
    r = subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, text=True)
    if r.returncode:
        log.warning("fusermount3 -u -z %s: %s", mountpoint, r.stderr.strip())


class _GoneReplies(logging.Filter):
    """pyfuse3 logs every failed reply as an error. ENOENT only says that the
    kernel no longer waits for that request: it was interrupted, or (a
    RELEASE after a lazy unmount) the connection was torn down when the last
    file closed. Nothing is lost, so it is debug-level, not an error."""

    def filter(self, record):
        if record.levelno == logging.ERROR and "fuse_reply_* failed" in record.msg \
                and record.args and record.args[-1] == os.strerror(errno.ENOENT):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger("pyfuse3").isEnabledFor(logging.DEBUG)
        return True


async def serve(args, transport, ready_fd=None):
    from nvmefs.controller import open_controller
    from nvmefs.fusefs import NvmeFS
    from nvmefs.lanes import Lanes, lane_cpus, requests_per_lane

    fuse_transport, why = getattr(args, "fuse_transport_picked", None) or pick_fuse_transport(args)
    cpus = lane_cpus(args.lanes)
    depth = args.uring_depth or requests_per_lane(len(cpus))
    lanes = Lanes(transport.arena, cpus, spin_ns=args.spin_us * 1000,
                  uring_depth=depth if fuse_transport == "uring" else 0,
                  uring_fault=os.environ.get("NVMEFS_URING_FAULT") == "register")
    if why:
        print(f"nvmefs: {why}: serving /dev/fuse", flush=True)
    async with open_controller(transport, io_queues=1, queue_entries=args.queue_depth + 1,
                               polled=args.polled, spin_us=args.spin_us, owners=[lanes]) as ctrl:
        fs = NvmeFS(ctrl, lanes, direct_io=not args.page_cache, extra_stats={"fuse": fuseshim.stats})
        options = set(pyfuse3.default_options)
        options |= {"fsname=nvmefs", "subtype=nvmefs"}
        if os.getuid() == 0:
            options.add("allow_other")
        logging.getLogger("pyfuse3").addFilter(_GoneReplies())
        fuseshim.arm(lanes.set.max_write, lanes.max_background)
        try:
            pyfuse3.init(fs, args.mountpoint, options)
        except BaseException:
            fuseshim.close()
            raise
        state = {"unmounted": False}
        try:
            if fuseshim.sessions() == 0 or fuseshim.session_fd() < 0:
                raise RuntimeError("the FUSE shim did not see pyfuse3's session (pyfuse3 built against "
                                   "libfuse >= 3.17 headers, or libfuse bound before nvmefs._fuseshim)")
            fuseshim.route_replies()
            await _serve(args, transport, fs, lanes, state, ready_fd)
        finally:
            pyfuse3.close(unmount=not state["unmounted"])
            lanes.close()
            fuseshim.close()
    if state.get("failed"):
        return 1
    errs = lanes.exit_errors
    if errs:
        print(f"nvmefs: error: lane(s) {sorted(errs)} failed reading /dev/fuse "
              f"({os.strerror(-next(iter(errs.values())))}); {args.mountpoint} unmounted, controller shut down",
              file=sys.stderr, flush=True)
        return 1
    if lanes.aborted:
        print("nvmefs: warning: the kernel aborted the FUSE connection (requests it still held got "
              "ECONNABORTED)", flush=True)
    print(f"nvmefs: {args.mountpoint} unmounted, controller shut down cleanly", flush=True)
    return 0


def mount_bdi(mountpoint):
    """The nvmefs mount's backing device ("major:minor"), from the mount
    table: only the mount point's parent is resolved, since realpath() of
    the mount point itself would be a request to the mount this thread
    serves."""
    path = os.path.abspath(mountpoint).rstrip("/") or "/"
    target = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    found = [dev for point, fstype, dev in fuse_mounts() if point == target and fstype == "fuse.nvmefs"]
    return found[-1] if found else None      # the last one: it is on top


def raise_dirty_share(mountpoint):
    """--page-cache: this mount may hold DIRTY_SHARE % of the dirty-page
    threshold instead of FUSE's 1% (root only; else one line says so)."""
    bdi = mount_bdi(mountpoint)
    try:
        if bdi is None:
            raise OSError(errno.ENOENT, "the mount is not in /proc/self/mountinfo")
        with open(f"/sys/class/bdi/{bdi}/max_ratio", "w") as f:
            f.write(str(DIRTY_SHARE))
    except OSError as exc:
        print(f"nvmefs: --page-cache: this mount keeps FUSE's 1% share of dirty pages "
              f"(/sys/class/bdi/{bdi}/max_ratio: {os_text(exc)})", flush=True)
        return
    log.info("--page-cache: the mount may hold %d%% of the dirty-page threshold (bdi %s; FUSE's default 1%%)",
             DIRTY_SHARE, bdi)


async def _serve(args, transport, fs, lanes, state, ready_fd):
    async with trio.open_nursery() as nursery:
        await nursery.start(lanes.run)
        lanes.start(fuseshim.session_fd(), fuseshim.forwarder(), want_uring=fuseshim.want_uring)
        pyfuse3_done = trio.Event()

        async def pyfuse3_main():
            try:
                await pyfuse3.main(min_tasks=4, max_tasks=64)
            finally:
                pyfuse3_done.set()
        nursery.start_soon(pyfuse3_main)
        if lanes.uring_depth and not await _settle_fuse_transport(args, lanes):
            # --fuse-transport uring, and the kernel did not take the rings:
            # unmount the usual way (nothing is open yet), exit 1
            state["failed"] = state["unmounted"] = True
            detach(args.mountpoint)
            await lanes.ended.wait()
            fuseshim.end()
            with trio.move_on_after(SHUTDOWN_GRACE):
                await pyfuse3_done.wait()
            nursery.cancel_scope.cancel()
            return
        if args.page_cache:
            raise_dirty_share(args.mountpoint)
        names = [f"{args.mountpoint.rstrip('/')}/{fs.name_of(n)}" for n in sorted(fs.ctrl.namespaces)]
        print(f"nvmefs: {transport.name} mounted on {args.mountpoint} ({lanes.count} lane"
              f"{'s' if lanes.count > 1 else ''}, FUSE over {lanes.fuse_transport}): " + " ".join(names),
              flush=True)
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)
        # Installed first so that the signal receiver below restores them
        # when it closes: from then on, through shutdown, signals are
        # logged and ignored and can never interrupt the NVMe shutdown.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda n, f: log.warning("shutdown in progress; signal ignored"))
        nursery.start_soon(_on_signals, args.mountpoint, lanes)
        # the lanes end when the connection does: unmounted (or, after a
        # signal, the last open file closed, or the grace time over)
        await lanes.ended.wait()
        # ENODEV: the connection is gone; else (stopped, or a lane failed)
        # it still is, and pyfuse3.close() unmounts
        state["unmounted"] = not lanes.stopped_early and not lanes.exit_errors
        # pyfuse3's loop ends once it has taken the requests still queued
        fuseshim.end()
        with trio.move_on_after(SHUTDOWN_GRACE):
            await pyfuse3_done.wait()
        nursery.cancel_scope.cancel()


async def _settle_fuse_transport(args, lanes):
    """Once FUSE_INIT is answered: whether the kernel really serves the
    mount on the rings, by one request of our own (a getxattr nobody has)
    and the rings' counters -- REGISTER says nothing when it works.  One
    line when it is not io_uring; False if --fuse-transport uring wanted it."""
    why = lanes.uring_error
    if why is None:
        with trio.move_on_after(30):
            while lanes.set.uring_state == "pending":
                await trio.sleep(0.005)
        if lanes.set.uring_state == "pending":
            why = "FUSE_INIT was not answered within 30 s"
        elif lanes.set.uring_state == "declined":
            why = "the kernel did not offer it at FUSE_INIT"
        else:
            before = lanes.ring_requests()
            with trio.move_on_after(10) as probe:
                try:
                    await trio.to_thread.run_sync(os.getxattr, args.mountpoint, "user.nvmefs.probe",
                                                  abandon_on_cancel=True)
                except OSError:
                    pass
            errs = [st["register_error"] for st in lanes.set.stats() if st["register_error"]]
            if lanes.ring_requests() > before:
                lanes.transport_seen = "io_uring"
                return True
            if probe.cancelled_caught and args.fuse_transport == "uring":
                # every request of the mount waits for rings that never
                # came; only the end of this process ends the connection
                print("nvmefs: error: --fuse-transport uring: a request on the rings was not answered "
                      "within 10 s", file=sys.stderr, flush=True)
                os._exit(1)
            if errs:
                why = f"the kernel refused the io_uring entries ({os.strerror(-errs[0])})"
            elif probe.cancelled_caught:
                why = "a request on the rings was not answered within 10 s"
            else:
                why = "the kernel kept serving /dev/fuse"
    lanes.transport_seen = "/dev/fuse"
    if args.fuse_transport == "uring":
        print(f"nvmefs: error: --fuse-transport uring: {why}", file=sys.stderr, flush=True)
        return False
    print(f"nvmefs: FUSE over io_uring not used: {why}; serving /dev/fuse", flush=True)
    return True


async def _on_signals(mountpoint, lanes):
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.warning("%s: unmounting; files still open are served until closed (at most %.0f s)",
                        signal.Signals(sig).name, SHUTDOWN_GRACE)
            detach(mountpoint)
            break
        with trio.move_on_after(SHUTDOWN_GRACE):
            async for sig in sigs:
                log.warning("%s: shutdown in progress; signal ignored", signal.Signals(sig).name)
        log.warning("files of %s still open after %.0f s: closing the connection", mountpoint, SHUTDOWN_GRACE)
        lanes.stopped_early = True
        await lanes.stop()
        async for sig in sigs:
            log.warning("%s: shutdown in progress; signal ignored", signal.Signals(sig).name)


def run_mount(args):
    args.mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(args.mountpoint)
    check_fuse()
    if args.background and not args.ready_fd:
        # the daemon decides (and, with --enable-uring, switches it on): its
        # line goes to the log the parent shows when it fails
        pick = None
    else:
        pick = pick_fuse_transport(args)
    args.fuse_transport_picked = pick
    if args.device:
        return run_mount_device(args)
    # absolute: the transport's name carries it, and `nvmefs <verb>` run from
    # another directory finds this mount by it (cli.mount_serving)
    image = os.path.abspath(args.image or default_image())
    create = check_image(image, args.size, args.lba_size, create=True)
    if args.background and not args.ready_fd:
        return spawn_background(args)
    if create:
        per = create_image(image, args.size, args.namespaces, args.lba_size, args.capacity)
        print(f"nvmefs: created sparse image {image} ({args.namespaces} x {per} bytes, "
              f"{args.lba_size}-byte LBAs" + (f", capacity {args.capacity} bytes" if args.capacity else "")
              + ")", flush=True)
    from nvmefs.transport import ModelTransport
    try:
        transport = ModelTransport(image, create=False, sgl=args.sgl, vwc=args.write_cache == "on",
                                   max_io_queues=64, mdts=args.mdts, idle_spin_us=args.model_idle_us,
                                   raw_lba_size=args.lba_size)
    except Exception as exc:
        if create:
            os.unlink(image)        # we made it a moment ago: leave nothing behind
        if isinstance(exc, (OSError, ValueError, OverflowError)):
            raise UsageError(f"cannot open image {image}: {exc}") from None
        raise
    return serve_transport(args, transport)


def run_mount_device(args):
    """``nvmefs mount --device vfio:BDF|nvme-tcp://... MOUNTPOINT``: no image to check or create."""
    from nvmefs.tcp_url import is_tcp, tcp_options
    from nvmefs.lanes import Lanes, lane_cpus, possible_cpus, requests_per_lane
    from nvmefs.transport import open_transport
    from nvmefs.vfio import arena_for

    if args.background and not args.ready_fd:
        return spawn_background(args)
    n = len(lane_cpus(args.lanes))
    try:
        # trio's one queue with its bounce pool, and the lanes' queues and
        # buffers (pinned, on VFIO: every byte of the arena is)
        ring = (args.uring_depth or requests_per_lane(n)) \
            if read_enable_uring() and args.fuse_transport != "dev" else 0
        arena = arena_for(1) + arena_for(n, bounce_bytes=0,
                                        extra=Lanes.dma_bytes(n, uring_depth=ring, ncpu=len(possible_cpus())))
        options = dict(tcp_options(args), arena_size=arena) if is_tcp(args.device) else None
        transport = open_transport(args.device, arena_size=arena, tcp_options=options)
    except (OSError, ValueError) as exc:
        if is_tcp(args.device) and isinstance(exc, OSError):
            raise ConnectFailed(f"cannot connect to {args.device}: {os_text(exc)}") from None
        raise UsageError(f"cannot open device {args.device}: {exc}") from None
    return serve_transport(args, transport)


def serve_transport(args, transport):
    """Serve until unmounted, then close the transport (any transport)."""
    try:
        rc = trio.run(serve, args, transport, args.ready_fd)
    except Exception as exc:
        exc = unwrap(exc)
        if isinstance(exc, RuntimeError):     # pyfuse3.init failures
            print(f"nvmefs: error: cannot mount on {args.mountpoint}: {exc}", file=sys.stderr)
            return 1
        raise exc from None
    finally:
        # Python's finalization puts the default handlers back, so a signal
        # sent during the last moments would kill an already cleanly shut
        # down daemon (exit -15): they stay blocked, and are dropped at exit.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        transport.close()
    return rc


def log_path(mountpoint):
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    name = mountpoint.strip("/").replace("/", "_") or "root"
    return os.path.join(base, "nvmefs", f"{name}.log")


def spawn_background(args):
    """Run the daemon as a child and return once it reports the mount ready.
    The child's output goes to a log file (so that `$(nvmefs mount -b ...)`
    returns), whose tail is shown if the child fails to mount."""
    logfile = log_path(args.mountpoint)
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    r, w = os.pipe()
    argv = [sys.executable, "-m", "nvmefs"] + [a for a in args.argv if a not in ("--background", "-b")]
    argv += ["--ready-fd", str(w)]
    with open(logfile, "ab") as log_f:
        child = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=log_f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read(3)
    if msg != b"ok\n":
        child.wait()
        with open(logfile, "rb") as f:
            tail = f.read().decode(errors="replace").strip().splitlines()[-1:]
        raise UsageError(tail[0].removeprefix("nvmefs: error: ") if tail else
                         f"the background daemon exited with status {child.returncode}")
    print(f"nvmefs: mounted on {args.mountpoint} in the background (pid {child.pid}, log {logfile}); "
          f"stop it with 'fusermount3 -u {args.mountpoint}' or 'kill {child.pid}'", flush=True)
    return 0
