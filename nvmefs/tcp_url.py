"""What names a controller reached over NVMe/TCP: the ``nvme-tcp://`` URL
of ``--device`` and the command line's fabrics options (nvme-cli's names).
Kept apart from nvmefs/tcp.py so the CLI can parse and route them without
loading the driver core."""
import re

DEFAULT_PORT = 4420

# the TcpTransport keyword arguments the command line sets
OPTIONS = ("hostnqn", "hostid", "nr_io_queues", "hdr_digest", "data_digest", "keep_alive_tmo",
           "reconnect_delay", "ctrl_loss_tmo", "disable_sqflow")

_URL = re.compile(r"^nvme-tcp://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]+))(?::(?P<port>\d+))?/(?P<nqn>.+)$")


def parse_url(url):
    """``nvme-tcp://HOST[:PORT]/SUBNQN`` -> (host, port, subnqn)."""
    m = _URL.match(url)
    if not m:
        raise ValueError(f"{url!r}: expected nvme-tcp://HOST[:PORT]/SUBNQN "
                         "(e.g. nvme-tcp://127.0.0.1:4420/nqn.2024-01.io.example:disk1)")
    port = int(m.group("port") or DEFAULT_PORT)
    if not 0 < port < 65536:
        raise ValueError(f"{url!r}: port {port} out of range")
    nqn = m.group("nqn")
    if len(nqn.encode()) > 223:
        raise ValueError(f"{url!r}: an NQN is at most 223 bytes")
    return m.group("v6") or m.group("host"), port, nqn


def canonical_url(url):
    host, port, nqn = parse_url(url)
    return f"nvme-tcp://{'[' + host + ']' if ':' in host else host}:{port}/{nqn}"




def is_tcp(device):
    return bool(device) and device.startswith("nvme-tcp:")


def tcp_options(args):
    """TcpTransport's keyword arguments from parsed command-line ``args``
    (options not given keep the transport's defaults)."""
    return {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
