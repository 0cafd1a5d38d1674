"""Read the metric history out of an offline W&B run file (wandb ships no public reader for it)."""

import json
import struct

from wandb.proto import wandb_internal_pb2


def _records(path):
    """The run file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunked records."""
    data, pos, block, pending = open(path, "rb").read(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
        elif kind == 0:
            pos += left - 7


def history(path) -> dict[str, list]:
    """Metric name -> logged values, in order."""
    out: dict[str, list] = {}
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                out.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return out
