"""Re-encode a pickle with the protocol-2 opcodes torch's ``weights_only`` unpickler reads.

That unpickler (the house rule for every pickle) speaks protocol 2, while Python writes protocol 4
by default, e.g. DCP's ``.metadata``. The rewrite changes only the encoding (no object is built),
and refuses any opcode the unpickler lacks, so what the unpickler then allows is all that loads.
"""

from __future__ import annotations

import pickletools
import struct

#: opcodes torch's weights_only unpickler reads, copied as they are: code -> fixed argument bytes
_PASS = {
    **dict.fromkeys(b"\x81RbaesuNt\x85\x86\x87\x88\x89)]}\x8f(Q.", 0),
    ord("K"): 1,
    ord("h"): 1,
    ord("q"): 1,
    ord("M"): 2,
    ord("J"): 4,
    ord("j"): 4,
    ord("r"): 4,
    ord("G"): 8,
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_BINGET, _LONG_BINGET, _BINPUT, _LONG_BINPUT, _STOP, _BINUNICODE, _SHORT_BINSTRING, _GLOBAL = b"hjqr.XUc"


def as_protocol2(data: bytes) -> bytes:
    """The pickle ``data`` re-encoded with the protocol-2 opcodes torch's weights_only unpickler reads.

    Only the encoding changes: ``FRAME`` is dropped, short/8-byte strings become ``BINUNICODE``,
    ``MEMOIZE`` becomes ``LONG_BINPUT`` with its implicit index, and ``STACK_GLOBAL`` (module and
    name pushed as strings) becomes ``GLOBAL``. The string pushes it consumed are removed; the
    memo slots they filled are filled by a prelude (one junk list at the bottom of the stack,
    which ``STOP`` ignores). Any opcode that unpickler lacks is refused here already.
    """
    out: list[bytes] = []
    tags: list[tuple | None] = []  # per item of out: ("str", s), ("put", idx) or None
    prelude: list[tuple[str, int]] = []
    memo: set[int] = set()
    memo_str: dict[int, str] = {}
    n, i = len(data), 0

    def put(idx: int) -> None:
        if idx in memo:
            raise ValueError(f"memo slot {idx} is written twice")
        memo.add(idx)
        if tags and tags[-1] and tags[-1][0] == "str":
            memo_str[idx] = tags[-1][1]
        out.append(b"r" + _U32.pack(idx))
        tags.append(("put", idx))

    def string(raw: bytes, length: int) -> None:
        if len(raw) != length:
            raise ValueError("truncated string")
        text = raw.decode("utf-8", "surrogatepass")
        out.append(b"X" + _U32.pack(len(raw)) + raw)
        tags.append(("str", text))

    def pop_string() -> str:
        puts = []
        while tags and tags[-1] and tags[-1][0] == "put":
            puts.append(tags.pop()[1])
            out.pop()
        if not tags or not tags[-1] or tags[-1][0] != "str" or tags[-1][1] is None:
            raise ValueError("STACK_GLOBAL not preceded by its module and name strings")
        out.pop()
        text = tags.pop()[1]
        prelude.extend((text, idx) for idx in puts)
        return text

    while True:
        if i >= n:
            raise ValueError("pickle ends before its STOP opcode")
        op = data[i]
        if op in _PASS:
            j = i + 1 + _PASS[op]
            if op == _BINGET or op == _LONG_BINGET:  # BINGET / LONG_BINGET: may push a known string
                idx = data[i + 1] if op == _BINGET else _U32.unpack_from(data, i + 1)[0]
                out.append(data[i:j])
                tags.append(("str", memo_str[idx]) if idx in memo_str else None)
            elif op == _BINPUT or op == _LONG_BINPUT:  # BINPUT / LONG_BINPUT
                put(data[i + 1] if op == _BINPUT else _U32.unpack_from(data, i + 1)[0])
            else:
                out.append(data[i:j])
                tags.append(None)
            i = j
            if op == _STOP:
                break
        elif op == 0x80 or op == 0x95:  # PROTO (one is written first), FRAME
            i += 2 if op == 0x80 else 9
        elif op == 0x8C:  # SHORT_BINUNICODE
            want = data[i + 1]
            string(data[i + 2 : i + 2 + want], want)
            i += 2 + want
        elif op == _BINUNICODE:  # BINUNICODE
            want = _U32.unpack_from(data, i + 1)[0]
            string(data[i + 5 : i + 5 + want], want)
            i += 5 + want
        elif op == 0x8D:  # BINUNICODE8
            want = _U64.unpack_from(data, i + 1)[0]
            string(data[i + 9 : i + 9 + want], want)
            i += 9 + want
        elif op == _SHORT_BINSTRING or op == 0x8A:  # SHORT_BINSTRING, LONG1: one length byte
            j = i + 2 + data[i + 1]
            out.append(data[i:j])
            tags.append(None)
            i = j
        elif op == 0x94:  # MEMOIZE
            put(len(memo))
            i += 1
        elif op == 0x93:  # STACK_GLOBAL
            gname, module = pop_string(), pop_string()
            if "\n" in module or "\n" in gname:
                raise ValueError("newline in a global's name")
            out.append(b"c" + f"{module}\n{gname}\n".encode("utf-8", "surrogatepass"))
            tags.append(None)
            i += 1
        elif op == _GLOBAL:  # GLOBAL: two lines
            j = data.index(b"\n", data.index(b"\n", i) + 1) + 1
            out.append(data[i:j])
            tags.append(None)
            i = j
        else:
            known = pickletools.code2op.get(chr(op))
            raise ValueError(f"pickle opcode {known.name if known else hex(op)} at byte {i} is not allowed")
    head = [b"\x80\x02"]
    if prelude:
        head.append(b"]")
        for text, idx in prelude:
            raw = text.encode("utf-8", "surrogatepass")
            head += [b"X" + _U32.pack(len(raw)) + raw, b"r" + _U32.pack(idx), b"a"]
    return b"".join(head + out)
