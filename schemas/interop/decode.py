#!/usr/bin/env python3
"""Decode Avro single-object encoded messages with fastavro, using only the files in schemas/.

Independent of the Rust codec: the fingerprint is computed here from the Avro specification
(CRC-64-AVRO of the parsing canonical form, little-endian after the C3 01 marker).

usage: decode.py FILE...   prints one JSON object per file
"""
import base64
import glob
import json
import os
import sys

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import to_parsing_canonical_form

EMPTY = 0xC15D213AA4D7A795


def _table():
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


TABLE = _table()


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for b in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ b) & 0xFF]
    return fp


def load_schemas(root):
    by_fp = {}
    for path in sorted(glob.glob(os.path.join(root, "*", "v*.avsc"))):
        with open(path) as f:
            schema = parse_schema(json.load(f))
        canonical = to_parsing_canonical_form(schema)
        fp = crc64_avro(canonical.encode()).to_bytes(8, "little")
        family = os.path.basename(os.path.dirname(path))
        version = os.path.basename(path)[1:-5]
        by_fp[fp] = (f"{family} v{version}", schema)
    return by_fp


def jsonable(value):
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return int(value.timestamp() * 1000)
    return value


def main():
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    schemas = load_schemas(root)
    import io

    for path in sys.argv[1:]:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] != b"\xc3\x01":
            sys.exit(f"{path}: not single-object encoded")
        name, schema = schemas.get(data[2:10], (None, None))
        if schema is None:
            sys.exit(f"{path}: unknown fingerprint {data[2:10].hex()}")
        buf = io.BytesIO(data[10:])
        record = schemaless_reader(buf, schema, None)
        if buf.read():
            sys.exit(f"{path}: trailing bytes")
        print(json.dumps({"file": os.path.basename(path), "schema": name, "record": jsonable(record)}))


if __name__ == "__main__":
    main()
