"""Decoders for the log pages the CLI shows (NVMe base spec, Get Log Page)."""
import struct


def _u128(raw, off):
    lo, hi = struct.unpack_from("<QQ", raw, off)
    return lo | (hi << 64)


def parse_smart(raw):
    """SMART / Health Information (LID 02h, 512 bytes)."""
    return {
        "critical_warning": raw[0],
        "temperature_k": struct.unpack_from("<H", raw, 1)[0],
        "available_spare_pct": raw[3],
        "available_spare_threshold_pct": raw[4],
        "percentage_used": raw[5],
        "data_units_read": _u128(raw, 32),
        "data_units_written": _u128(raw, 48),
        "host_read_commands": _u128(raw, 64),
        "host_write_commands": _u128(raw, 80),
        "controller_busy_time_min": _u128(raw, 96),
        "power_cycles": _u128(raw, 112),
        "power_on_hours": _u128(raw, 128),
        "unsafe_shutdowns": _u128(raw, 144),
        "media_errors": _u128(raw, 160),
        "num_err_log_entries": _u128(raw, 176),
    }


def parse_error_log(raw):
    """Error Information entries (LID 01h, 64 bytes each); empty entries
    (error count 0) are left out."""
    from nvmefs._core import decode_status
    rows = []
    for off in range(0, len(raw) - 63, 64):
        count, sqid, cid, status, ploc, lba, nsid = struct.unpack_from("<QHHHHQI", raw, off)
        if count == 0:
            continue
        # the entry's status field carries the phase tag position like a CQE's
        info = decode_status(status & 0xFFFE)
        rows.append({"error_count": count, "sqid": sqid, "cid": cid, "status": status,
                     "status_name": info.name, "param_location": ploc, "lba": lba, "nsid": nsid})
    return rows
