"""The admin verbs (nvme-cli's names where they overlap): each an async
function of a brought-up Controller and the verb's parameters, returning
plain data -- what `-o json` prints.

The CLI runs a verb on a controller it brings up itself, or, while a mount
holds the controller, hands it to that mount (nvmefs/fusefs.py: the
``user.nvmefs.admin`` attribute of its root), which runs the same function
on its own controller; the namespace files follow from the controller's
rescan (nvmefs/controller.py).
"""
from nvmefs.logpages import parse_error_log, parse_smart

ADM_FORMAT = 0x80
FEATURES = {"arbitration": 0x01, "power-management": 0x02, "temperature-threshold": 0x04,
            "volatile-write-cache": 0x06, "number-of-queues": 0x07, "interrupt-coalescing": 0x08,
            "async-event-configuration": 0x0B}
LBA_FORMATS = {512: 0, 4096: 1}

VERBS = {}
# verbs after which the namespace must not be in use by the mount (open
# files, a loop device) unless forced: its data goes away or changes shape
DISRUPTIVE = {"delete-ns", "detach-ns", "format"}


def verb(name):
    def add(fn):
        VERBS[name] = fn
        return fn
    return add


def _namespace(c, nsid):
    ns = c.namespaces.get(nsid)
    if ns is None:
        raise LookupError(f"namespace {nsid} does not exist or is not attached (active: {sorted(c.namespaces)})")
    return ns


@verb("id-ctrl")
async def id_ctrl(c):
    return c.id_ctrl


@verb("id-ns")
async def id_ns(c, namespace_id):
    return _namespace(c, namespace_id).info


@verb("list")
async def list_namespaces(c):
    return [{"name": f"nvme0n{n}", "nsid": n, "lba_size": ns.lba_size, "lbas": ns.nlbas,
             "size": ns.size, "model": c.id_ctrl["mn"], "serial": c.id_ctrl["sn"]}
            for n, ns in sorted(c.namespaces.items())]


@verb("list-ns")
async def list_ns(c, all=False):
    """Active NSIDs, or (``all``) every allocated one, attached or not."""
    if not all:
        return [{"nsid": n, "attached": True, "size": ns.size, "lba_size": ns.lba_size}
                for n, ns in sorted(c.namespaces.items())]
    return [{"nsid": n, "attached": n in c.namespaces, "size": info["nsze"] * info["lba_size"],
             "lba_size": info["lba_size"]} for n, info in sorted((await c.allocated_namespaces()).items())]


@verb("smart-log")
async def smart_log(c):
    return parse_smart(await c.get_log_page(0x02, 512))


@verb("error-log")
async def error_log(c):
    return parse_error_log(await c.get_log_page(0x01, 64 * (c.id_ctrl["elpe"] + 1)))


@verb("get-feature")
async def get_feature(c, feature_id):
    return {"feature": feature_id, "value": await c.get_features(feature_id)}


@verb("format")
async def format_nvm(c, namespace_id, lba_size, erase=False):
    _namespace(c, namespace_id)
    await c.admin(ADM_FORMAT, nsid=namespace_id, cdw10=LBA_FORMATS[lba_size] | ((1 if erase else 0) << 9),
                  timeout=600)
    return {"namespace": namespace_id, "lba_size": lba_size, "erased": erase}


@verb("create-ns")
async def create_ns(c, nsze, ncap=None, lba_size=512):
    nsid = await c.create_namespace(nsze, ncap, LBA_FORMATS[lba_size])
    return {"nsid": nsid, "nsze": nsze, "lba_size": lba_size, "size": nsze * lba_size}


async def _flush_before_it_goes(c, nsid):
    """What was written to a namespace reaches the media before the
    namespace leaves: a file still open on it (a forced detach) gets EIO for
    data from then on, and its close() has nothing left to flush."""
    for n in sorted(c.namespaces) if nsid == 0xFFFFFFFF else [nsid]:
        ns = c.namespaces.get(n)
        if ns is not None:
            await ns.flush()


@verb("delete-ns")
async def delete_ns(c, namespace_id):
    await _flush_before_it_goes(c, namespace_id)
    await c.delete_namespace(namespace_id)
    return {"nsid": namespace_id}


@verb("attach-ns")
async def attach_ns(c, namespace_id, controllers=None):
    await c.attach_namespace(namespace_id, controllers)
    return {"nsid": namespace_id, "controllers": controllers or [c.id_ctrl["cntlid"]]}


@verb("detach-ns")
async def detach_ns(c, namespace_id, controllers=None):
    await _flush_before_it_goes(c, namespace_id)
    await c.attach_namespace(namespace_id, controllers, detach=True)
    return {"nsid": namespace_id, "controllers": controllers or [c.id_ctrl["cntlid"]]}


def target_nsids(c, name, params):
    """The namespaces a disruptive verb touches."""
    nsid = params.get("namespace_id")
    if nsid == 0xFFFFFFFF:
        return sorted(c.namespaces)
    return [nsid] if name in DISRUPTIVE and nsid is not None else []
