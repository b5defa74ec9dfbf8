"""The VFIO transport against QEMU's NVMe controller, in the vfio lab.

The guest (tests/vfio_lab.py) boots ONCE per session and runs every test of
tests/guest/vfio_guest_tests.py in one pytest process; each host test below
reports one guest test's outcome (from the guest's junit XML), so a failure
names the guest test and carries its message.  Boot failures and timeouts
fail with the guest console attached.  A missing host prerequisite (QEMU,
the kernel package) skips locally and fails under CI (conftest.require).
"""
import ast
import os
import shutil
import xml.etree.ElementTree as ET

import pytest

import vfio_lab
from conftest import require

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST_FILE = os.path.join("tests", "guest", "vfio_guest_tests.py")
LAB_TIMEOUT = 240
# guest tests that leave a table in the scratch dir, shown with -s / -rA
REPORTS = {"test_differential_conformance": "conformance.txt",
           "test_bad_bus_addresses_do_no_harm": "dma_isolation.txt",
           "test_fuzz_against_qemu_and_model": "fuzz_diff.txt"}


def _guest_tests():
    with open(os.path.join(HERE, "guest", "vfio_guest_tests.py")) as f:
        tree = ast.parse(f.read())
    return [n.name for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")]


@pytest.fixture(scope="session")
def lab_run():
    try:
        vfio_lab.check_host()
        vfio_lab.build_guest(log=lambda m: None)
    except vfio_lab.LabUnavailable as exc:
        require(False, f"vfio lab: {exc}")
        return
    res = vfio_lab.run_pytest([GUEST_FILE, "-q"], timeout=LAB_TIMEOUT)
    junit = os.path.join(res.scratch, "junit.xml")
    if not os.path.exists(junit):
        raise vfio_lab.LabError(f"guest pytest ended with status {res.status} and no results",
                                res.console)
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        bad = [e for e in case if e.tag in ("failure", "error")]
        skipped = [e for e in case if e.tag == "skipped"]
        outcome = "failed" if bad else "skipped" if skipped else "passed"
        text = "\n".join((e.get("message") or "") + "\n" + (e.text or "") for e in bad + skipped)
        results[case.get("name")] = (outcome, text)
    res.results = results
    yield res
    if res.status == 0:
        shutil.rmtree(res.scratch, ignore_errors=True)   # kept for a look when something failed


@pytest.mark.timeout(LAB_TIMEOUT + 120)
@pytest.mark.parametrize("name", _guest_tests())
def test_in_guest(lab_run, name):
    mine = {k: v for k, v in lab_run.results.items() if k == name or k.startswith(name + "[")}
    if not mine:
        raise vfio_lab.LabError(f"guest test {name} did not run (guest status {lab_run.status})",
                                lab_run.console)
    table = os.path.join(lab_run.scratch, REPORTS.get(name, ""))
    if name in REPORTS and os.path.exists(table):
        with open(table) as f:
            print(f.read())
    failed = {k: text for k, (outcome, text) in mine.items() if outcome != "passed"}
    assert not failed, "\n\n".join(f"guest {k}:\n{text}" for k, text in failed.items())


def test_guest_exit_status(lab_run):
    """Everything in the guest passed, and it reported how long it took."""
    assert lab_run.status == 0, lab_run.console[-8000:]
    print(f"vfio lab: guest run {lab_run.seconds:.1f} s")
