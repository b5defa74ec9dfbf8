"""Helpers that run a real `nvmefs mount` daemon (pyfuse3 test/util.py habit:
wait for the mount, fail if the daemon died, always unmount in finally)."""
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


@contextlib.contextmanager
def read_only_copy(src, tmp_path, name):
    """A copy of ``src`` on a read-only bind mount, which binds root too
    (chmod does not: root opens a 0444 file for writing)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copy(src, ro / name)
    sh("mount", "--bind", str(ro), str(ro))
    try:
        sh("mount", "-o", "remount,ro,bind", str(ro))
        yield str(ro / name)
    finally:
        sh("umount", str(ro))


def tree_sums(root):
    """{relative path: sha256} of every file below ``root``."""
    sums = {}
    for d, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                sums[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return sums


def ext4_fill(dev, fsmnt, tree, ignore):
    """mkfs.ext4 on a direct-I/O loop device over ``dev``, a copy of
    ``tree`` into it, unmount, e2fsck -fn: the copy's tree_sums()."""
    loop = sh("losetup", "--find", "--show", "--direct-io=on", dev).strip()
    try:
        sh("mkfs.ext4", "-q", "-F", loop)
        sh("mount", loop, str(fsmnt))
        try:
            shutil.copytree(tree, os.path.join(fsmnt, "tree"), ignore=ignore)
            sums = tree_sums(os.path.join(fsmnt, "tree"))
        finally:
            sh("umount", str(fsmnt))
        sh("e2fsck", "-fn", loop)
    finally:
        subprocess.run(["losetup", "-d", loop])
    return sums


def ext4_check(dev, fsmnt, want):
    """The ext4_fill() copy on ``dev``, mounted read-only, has ``want``'s sums."""
    loop = sh("losetup", "--find", "--show", "-r", dev).strip()
    try:
        sh("mount", "-o", "ro", loop, str(fsmnt))
        try:
            assert tree_sums(os.path.join(fsmnt, "tree")) == want
        finally:
            sh("umount", str(fsmnt))
    finally:
        subprocess.run(["losetup", "-d", loop])


def nvmefs_cmd(*args):
    return [sys.executable, "-m", "nvmefs", *args]


# the FUSE transport mounts use unless a test names one (the fuse_transport
# fixture of conftest.py runs a test on each)
FUSE_TRANSPORT = {"value": None}


def start_daemon(*args, env=None):
    """`nvmefs ARGS` in the background; its output goes to files (a pipe
    nobody drains would stop a daemon that logs a lot), read by output()."""
    if args and args[0] == "mount" and FUSE_TRANSPORT["value"] and "--fuse-transport" not in args:
        args = (*args, "--fuse-transport", FUSE_TRANSPORT["value"])
    out, err = tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(nvmefs_cmd(*args), cwd=ROOT, stdout=out, stderr=err, text=True, env=env)
    proc.out_file, proc.err_file = out, err
    proc.wants_uring = "--fuse-transport" in args and args[args.index("--fuse-transport") + 1] == "uring"
    return proc


def output(proc):
    """(stdout, stderr) of a start_daemon() process so far."""
    proc.out_file.seek(0)
    proc.err_file.seek(0)
    return proc.out_file.read(), proc.err_file.read()


def run_cli(*args, timeout=120, **kw):
    return subprocess.run(nvmefs_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


def stats(mnt):
    """What `nvmefs stats --json` prints for the mount at ``mnt``."""
    return json.loads(os.getxattr(mnt, "user.nvmefs.stats"))


def _wait_for_rings(proc, mnt, deadline):
    """A mount asked for FUSE over io_uring serves on the rings, or the test
    of that transport would pass on /dev/fuse unnoticed."""
    while True:
        lanes = stats(mnt)["lanes"]
        if lanes["fuse_transport"] == "io_uring":
            return
        if lanes["fuse_transport"] != "pending" or time.monotonic() > deadline:
            raise AssertionError(f"{mnt}: FUSE transport {lanes['fuse_transport']}, not io_uring:\n"
                                 f"{output(proc)}")
        time.sleep(0.02)


def wait_for_mount(proc, mnt, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mnt):
            if getattr(proc, "wants_uring", False):
                _wait_for_rings(proc, mnt, deadline)
            return
        if proc.poll() is not None:
            out, err = output(proc)
            raise AssertionError(f"nvmefs exited with {proc.returncode} before mounting:\n{out}\n{err}")
        time.sleep(0.05)
    raise AssertionError(f"{mnt} not mounted after {timeout} s")


def stop(proc, mnt, how="fusermount", timeout=60):
    """End the daemon; returns its exit status."""
    if proc.poll() is None:
        if how == "fusermount" and os.path.ismount(mnt):
            r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True, timeout=30)
            if r.returncode:
                # busy (a test left a file open): kill rather than leave a
                # daemon behind, and report it as a failed stop
                proc.kill()
                proc.wait()
                subprocess.run(["fusermount3", "-u", "-z", mnt], timeout=30)
                raise AssertionError(f"fusermount3 -u {mnt} failed: {r.stderr.strip()}")
        elif how in ("SIGINT", "SIGTERM"):
            proc.send_signal(getattr(signal, how))
        elif how == "kill":
            proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], timeout=30)
    return proc.returncode


@contextlib.contextmanager
def mounted(mnt, image, *extra, env=None):
    os.makedirs(mnt, exist_ok=True)
    proc = start_daemon("mount", mnt, "--image", image, *extra, env=env)
    try:
        wait_for_mount(proc, mnt)
        yield proc
    except BaseException:
        stop(proc, mnt)
        raise
    # a daemon that does not end by itself once unmounted (stop() kills it
    # after a minute) is a bug, whatever the test checked before
    rc = stop(proc, mnt)
    assert rc == 0, f"nvmefs exited with {rc} after fusermount3 -u:\n{output(proc)[1]}"
