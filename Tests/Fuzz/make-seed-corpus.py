#!/usr/bin/env python3
"""Writes the committed seed corpus (Corpus/*): real uffd_msg layouts, Firecracker handshake bodies, and received
messages with their control buffers (SCM_RIGHTS)."""
import json, os, struct

os.chdir(os.path.dirname(os.path.abspath(__file__)))
os.makedirs("Corpus/fault-message", exist_ok=True)
os.makedirs("Corpus/handshake", exist_ok=True)
os.makedirs("Corpus/fd-message", exist_ok=True)

def msg(event, *fields):
    b = bytearray(32)
    b[0] = event
    for i, f in enumerate(fields):
        struct.pack_into("<Q", b, 8 + 8 * i, f)
    return bytes(b)

messages = {
    "pagefault-read": msg(0x12, 0, 0x7F0000001234, 0),
    "pagefault-write-wp": msg(0x12, 3, 0x7F0000002000, 0),
    "pagefault-minor": msg(0x12, 4, 0x7F0000003000, 0),
    "fork": msg(0x13, 7),
    "remap": msg(0x14, 0x1000, 0x200000, 0x3000),
    "remove": msg(0x15, 0x7F0000000000, 0x7F0000010000),
    "unmap": msg(0x16, 0x7F0000000000, 0x7F0000010000),
    "remove-inverted": msg(0x15, 0x2000, 0x1000),
    "unknown-event": msg(0x42),
    "short": b"\x12" * 16,
}
for name, data in messages.items():
    open(f"Corpus/fault-message/{name}", "wb").write(data)

def region(base, size, offset, page):
    return {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": page, "page_size_kib": page}

bodies = {
    "two-regions": [region(0x7F0000000000, 1 << 20, 0, 4096), region(0x7F0000200000, 1 << 20, 1 << 20, 4096)],
    "legacy": [{"base_host_virt_addr": 0x7F0000000000, "size": 1 << 20, "offset": 0}],
    "huge": [region(0x7F0000000000, 4 << 20, 0, 2 << 20)],
    "overlap": [region(0x7F0000000000, 1 << 20, 0, 4096), region(0x7F0000000000, 1 << 20, 1 << 20, 4096)],
    "top-of-address-space": [region(0xFFFFFFFFFFFFF000, 4096, 0, 4096)],
    "empty": [],
}
for name, body in bodies.items():
    open(f"Corpus/handshake/{name}", "w").write(json.dumps(body))
open("Corpus/handshake/truncated", "w").write('[{"base_host_virt_addr": 1, "size": ')
open("Corpus/handshake/not-a-list", "w").write('{"a": 1}')

# fd-message: selector byte (bit 0 MSG_TRUNC, bit 1 MSG_CTRUNC, bit 2 MSG_EOR, bit 3 MSG_CMSG_CLOEXEC), payload length,
# payload, then the control buffer as the kernel lays it out on 64-bit Linux (see Sources/FuzzFdMessage).
SOL_SOCKET, SCM_RIGHTS, SCM_CREDENTIALS = 1, 1, 2

def cmsg(data, level=SOL_SOCKET, kind=SCM_RIGHTS, length=None, padded=True):
    b = struct.pack("<QiI", 16 + len(data) if length is None else length, level, kind) + data
    return b + b"\0" * ((-len(b)) % 8 if padded else 0)

def rights(*fds, **kw):
    return cmsg(struct.pack(f"<{len(fds)}i", *fds), **kw)

def received(control, payload=b"uffd", selector=0):
    return bytes([selector, len(payload)]) + payload + control

fd_messages = {
    "empty": received(b"", payload=b""),
    "one-fd": received(rights(7)),
    "one-fd-unpadded": received(rights(7, padded=False)),
    "three-fds": received(rights(3, 4, 5)),
    "two-messages": received(rights(3, 4, 5) + rights(6)),
    "credentials-then-rights": received(cmsg(struct.pack("<iII", 1234, 0, 0), kind=SCM_CREDENTIALS) + rights(9)),
    "sixteen-fds": received(rights(*range(100, 116))),
    "seventeen-fds": received(rights(*range(100, 110)) + rights(*range(110, 117))),
    "length-below-header": received(rights(5) + rights(6, length=8)),
    "length-past-end": received(rights(5) + rights(6, length=4096)),
    "rights-not-whole-ints": received(cmsg(b"\1\0\0\0\2", length=21)),
    "partial-header": received(rights(4) + struct.pack("<Q", 20)),
    "control-truncated": received(rights(3, 4), selector=2),
    "payload-truncated": received(rights(3), payload=b"x" * 200, selector=1),
}
for name, data in fd_messages.items():
    open(f"Corpus/fd-message/{name}", "wb").write(data)
