"""`nvmefs mount`: bring a controller up and serve its namespaces through FUSE.

Everything that can be checked is checked before anything is created or
mounted, so bad input exits with one line and leaves the image untouched.
SIGINT, SIGTERM and `fusermount3 -u` all end the same way: unmount, NVMe
Flush, controller shutdown, exit 0.  Further signals during that shutdown
are ignored (logged), so the image is never left half-written.
"""
import errno
import logging
import os
import shutil
import signal
import stat
import sys

from nvmefs import fuseshim  # noqa: F401  (before pyfuse3 binds libfuse: adds fallocate)
import pyfuse3
import trio


log = logging.getLogger("nvmefs.mount")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def default_image():
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "nvmefs", "nvme0.img")


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


def check_image(path, size, lba_size, create):
    """Returns True when the image must be created."""
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise UsageError(f"image {path} is not a regular file")
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


async def serve(args, transport, ready_fd=None):
    from nvmefs.controller import open_controller
    from nvmefs.fusefs import NvmeFS

    threaded = not args.no_direct_lane and not args.no_lane_thread
    lane_queue = threaded and not args.no_lane_queue
    async with open_controller(transport, io_queues=args.queues, queue_entries=args.queue_depth + 1,
                               polled=args.polled, spin_us=args.spin_us, lane_queue=lane_queue) as ctrl:
        fs = NvmeFS(ctrl, direct_io=not args.page_cache)
        if lane_queue and not fs.start_engine():
            log.info("the controller granted no I/O queue for the lane thread: it runs the direct lane "
                     "on the shared queues")
        options = set(pyfuse3.default_options)
        options |= {"fsname=nvmefs", "subtype=nvmefs"}
        if os.getuid() == 0:
            options.add("allow_other")
        fuseshim.set_fallocate_handler(fs.fallocate_request)
        # with the engine, what it declines goes straight to pyfuse3's
        # handlers: DirectLane would decline it too
        if not args.no_direct_lane and fs.engine is None:
            fuseshim.set_lane(fs.lane_read, fs.lane_write)
        hooked, laned = fuseshim.sessions_hooked(), fuseshim.lane_sessions()
        fuseshim.arm_lane_thread(threaded)
        fuseshim.set_engine(fs.engine)
        try:
            pyfuse3.init(fs, args.mountpoint, options)
        except BaseException:
            fuseshim.lane_close()       # the session may exist, its pipe does
            fuseshim.set_engine(None)
            raise
        finally:
            fuseshim.arm_lane_thread(False)
        if fuseshim.lane_threaded():
            fs.lane_thread = fuseshim.LaneThread()
        elif fs.engine is not None:
            # the session did not get the thread: nothing drives the engine
            fuseshim.set_engine(None)
            fs.drop_engine()
            fuseshim.set_lane(fs.lane_read, fs.lane_write)
        if fuseshim.sessions_hooked() == hooked:
            log.warning("fallocate is not available on this mount (EOPNOTSUPP), nor the direct lane: "
                        "the nvmefs._fuseshim hook did not reach libfuse's fuse_session_new (not built, "
                        "or pyfuse3 built against libfuse >= 3.17 headers)")
        fs.lane_on = not args.no_direct_lane and fuseshim.lane_sessions() > laned
        state = {"unmounted": False}
        try:
            names = [f"{args.mountpoint.rstrip('/')}/{fs._name(n).decode()}" for n in sorted(ctrl.namespaces)]
            print(f"nvmefs: {transport.name} mounted on {args.mountpoint}: " + " ".join(names), flush=True)
            if ready_fd is not None:
                os.write(ready_fd, b"ok\n")
                os.close(ready_fd)
            # Installed first so that the signal receiver below restores them
            # when it closes: from then on, through shutdown, signals are
            # logged and ignored and can never interrupt the NVMe shutdown.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, lambda n, f: log.warning("shutdown in progress; signal ignored"))
            # fallocate requests run here, outside pyfuse3's workers; the
            # nursery drains them after pyfuse3.main() has returned
            async with trio.open_nursery() as requests:
                fs.nursery = requests
                if fs.lane_thread is not None:
                    fs.lane_thread.start()
                await _serve_until_unmounted(state, requests.cancel_scope)
                if fs.lane_thread is not None:
                    # before the drain and the controller's shutdown: from
                    # here on nothing reads /dev/fuse until the unmount.
                    # The nursery still takes the tasks its last answers
                    # may need (a failed command's retry).
                    fs.lane_thread.stop()
                    if fs.lane_thread.result:
                        state["unmounted"] = False      # it failed; the kernel still has us
                        state["failed"] = f"the lane thread failed: {fs.lane_thread.result!r}"
                fs.nursery = None
                with trio.move_on_after(60):
                    while requests.child_tasks:
                        await trio.sleep(0.01)
                requests.cancel_scope.cancel()
        finally:
            if fs.lane_thread is not None:
                fs.lane_thread.stop()
            pyfuse3.close(unmount=not state["unmounted"])
            fuseshim.lane_close()
            fuseshim.set_engine(None)
            fuseshim.set_fallocate_handler(None)
            fuseshim.set_lane(None, None)
    if state.get("failed"):
        print(f"nvmefs: error: {state['failed']}; {args.mountpoint} unmounted, controller shut down",
              file=sys.stderr, flush=True)
        return 1
    print(f"nvmefs: {args.mountpoint} unmounted, controller shut down cleanly", flush=True)
    return 0


async def _serve_until_unmounted(state, requests_scope):
    async with trio.open_nursery() as nursery:
        async def on_signal():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as sigs:
                async for sig in sigs:
                    log.warning("%s: unmounting once requests in flight are answered",
                                signal.Signals(sig).name)
                    # stop taking requests, let running handlers finish
                    # (no half-done read-modify-write), then unmount
                    state["signalled"] = True
                    pyfuse3.terminate()
                    break
                with trio.move_on_after(60):
                    async for sig in sigs:
                        log.warning("%s: shutdown in progress; signal ignored",
                                    signal.Signals(sig).name)
                log.error("requests still running after 60 s: cancelling them")
                nursery.cancel_scope.cancel()
                requests_scope.cancel()

        async def fuse_main():
            await pyfuse3.main(min_tasks=8, max_tasks=256)
            # ended by fusermount3 -u unless we terminated it on a signal
            state["unmounted"] = not state.get("signalled")
            nursery.cancel_scope.cancel()

        nursery.start_soon(on_signal)
        nursery.start_soon(fuse_main)


def run_mount(args):
    from nvmefs.transport import ModelTransport

    args.mountpoint = os.path.abspath(args.mountpoint)
    check_mountpoint(args.mountpoint)
    check_fuse()
    if args.device:
        from nvmefs.vfio import run_mount_device
        return run_mount_device(args)
    image = args.image or default_image()
    create = check_image(image, args.size, args.lba_size, create=True)
    if args.background and not args.ready_fd:
        return spawn_background(args)
    if create:
        from nvmefs import _core
        per = args.size // args.namespaces // args.lba_size * args.lba_size
        _core.create_image(image, tuple((per, args.lba_size) for _ in range(args.namespaces)))
        print(f"nvmefs: created sparse image {image} ({args.namespaces} x {per} bytes, "
              f"{args.lba_size}-byte LBAs)", flush=True)
    try:
        transport = ModelTransport(image, create=False, sgl=args.sgl, vwc=args.write_cache == "on",
                                   max_io_queues=max(args.queues or 0, 64), mdts=args.mdts,
                                   idle_spin_us=args.model_idle_us)
    except Exception as exc:
        if create:
            os.unlink(image)        # we made it a moment ago: leave nothing behind
        if isinstance(exc, (OSError, ValueError, OverflowError)):
            raise UsageError(f"cannot open image {image}: {exc}") from None
        raise
    return serve_transport(args, transport)


def serve_transport(args, transport):
    """Serve until unmounted, then close the transport (any transport)."""
    try:
        rc = trio.run(serve, args, transport, args.ready_fd)
    except Exception as exc:
        from nvmefs.cli import unwrap
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
    import subprocess
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
