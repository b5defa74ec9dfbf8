"""The kernel's table of mounts (/proc/self/mountinfo), for the CLI (which
mounts are nvmefs's) and the mount itself (its backing device).  Reading
it sends no request to a FUSE mount, as a stat() of the mount point would:
the mount's own thread must not make one."""
import re


def fuse_mounts():
    """(mount point, filesystem type, "major:minor") of each FUSE mount,
    in mount order (a later one is on top of an earlier one)."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                # optional fields, then "-", then the type (proc(5))
                sep = fields.index("-") if "-" in fields else -1
                if 4 < sep < len(fields) - 1 and fields[sep + 1].startswith("fuse"):
                    # octal escapes for blanks in the path (\040)
                    point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                    out.append((point, fields[sep + 1], fields[2]))
    except OSError:
        pass
    return out
