"""The length in characters of JSON strings, measured on their raw bytes.

Ingest keeps only the length of a review's text (unless ``ingest.keep_text``). Building each text
as a Python string just to take its ``len`` is most of what the text costs; msgspec can instead
hand over each value's raw JSON (``msgspec.Raw``, a view of the input, no copy) after checking it
as JSON (escapes, control characters, surrogate pairs; not UTF-8). What a string holds is then
counted here for a whole block at once: the characters of the raw bytes (UTF-8 checked by Arrow),
less the two quotes, less what each escape sequence saves (``\\n``: two bytes, one character;
``\\u00e9``: six, one; a surrogate pair ``\\ud83d\\ude00``: twelve, one code point). The count
equals ``len`` of the decoded string (tests/test_jsontext.py compares them on random strings).

Measured on 2026-12-03 (2-core AMD EPYC, one thread): decoding a 16 MB block of the benchmark's
reviews and building its columns took 1.46 s per million reviews against 1.75 s with the text
built; reading a whole file of 4.05M reviews, 11.6 s of CPU against 12.6 s (means of five runs,
alternated). On text with non-ASCII characters and escapes in every review: 1.81 s against 1.78
s, even.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

_QUOTE, _BACKSLASH, _N = ord('"'), ord("\\"), ord("n")
_U = ord("u")


def _byte_set(chars: bytes) -> np.ndarray:
    table = np.zeros(256, bool)
    table[np.frombuffer(chars, np.uint8)] = True
    return table


#: The first two hex digits of a high surrogate, \ud800 to \udbff.
_HIGH_1, _HIGH_2 = _byte_set(b"dD"), _byte_set(b"89abAB")


class NotText(ValueError):
    """A value that is not a JSON string or null, or a string that is not UTF-8."""


def string_lengths(raws: Sequence[msgspec.Raw]) -> pa.Array:
    """The length in characters (code points) of each raw JSON value of ``raws``, each a string
    or ``null`` (null: a null length), as an int32 array. Raises NotText when a value is
    another JSON type or its bytes are not UTF-8: the caller then reads those lines the slow
    way, which names the reason. The values must be valid JSON (as msgspec checks them)."""
    n = len(raws)
    if not n:
        return pa.array([], pa.int32())
    sizes = np.fromiter(map(len, raws), np.int64, n)
    joined = b"".join(raws)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    data = np.frombuffer(joined, np.uint8)
    first = data[starts]
    null = first == _N  # valid JSON starting with n: null
    if not (null | (first == _QUOTE)).all():
        raise NotText("a value that is not a string")
    if joined.isascii():
        chars = sizes - 2
    else:
        # 64-bit offsets: a block's texts may pass 2 GiB (one line longer than a block is read
        # whole).
        offsets = pa.py_buffer(np.concatenate([[0], ends]).astype(np.int64))
        binary = pa.Array.from_buffers(pa.large_binary(), n,
                                       [None, offsets, pa.py_buffer(joined)])
        try:
            text = binary.cast(pa.large_string())  # checks UTF-8 (overlong forms, surrogates)
        except pa.ArrowInvalid:
            raise NotText("bytes that are not UTF-8") from None
        chars = pc.utf8_length(text).to_numpy().astype(np.int64) - 2
    if _BACKSLASH in joined:
        chars -= _escape_savings(data, ends, n)
    return pa.array(chars, pa.int32(), mask=null)


#: A uint64 (little-endian) holding one true bool: its byte k is the one set.
_ONE_BYTE = np.array([1 << (8 * k) for k in range(8)], np.uint64)


def byte_positions(data: bytes | memoryview | np.ndarray, byte: int) -> np.ndarray:
    """Where ``byte`` is in ``data`` (int64 offsets, ascending), for a byte that is rare
    (newlines, backslashes).

    Found 8 bytes at a time: numpy's ``flatnonzero`` over a 16 MB mask takes ~5 ms, over the
    mask read as 2M uint64 words ~0.7 ms; a word holding one such byte gives its place from the
    word's value, the few holding more are searched byte by byte."""
    mask = np.frombuffer(data, np.uint8) == byte
    whole = len(mask) - len(mask) % 8
    words = mask[:whole].view("<u8")
    at = np.flatnonzero(words != 0)
    found = words[at]
    offsets = at * 8 + np.searchsorted(_ONE_BYTE, found)
    several = (found & (found - np.uint64(1))) != 0
    if several.any():
        rows = at[several]
        row, col = np.nonzero(mask[:whole].reshape(-1, 8)[rows])
        offsets = np.sort(np.concatenate([offsets[~several], rows[row] * 8 + col]))
    if whole < len(mask):
        offsets = np.concatenate([offsets, np.flatnonzero(mask[whole:]) + whole])
    return offsets


def _escape_savings(data: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """For each value, how many more characters its escape sequences take in JSON than in the
    string. An escape starts at a backslash that is not itself escaped: in a run of backslashes,
    the first, third, fifth... (inside a string, a run can only hold escape starts and escaped
    backslashes). Each saves one character; ``\\uXXXX`` four more; a high surrogate one more
    again (its pair is one code point)."""
    escapes = byte_positions(data, _BACKSLASH)
    apart = np.diff(escapes) != 1
    if not apart.all():  # a run of backslashes: keep its escape starts
        head = np.ones(len(escapes), bool)
        head[1:] = apart
        escapes = escapes[(escapes - escapes[head][np.cumsum(head) - 1]) % 2 == 0]
    saved = np.ones(len(escapes), np.int64)
    is_u = data[escapes + 1] == _U
    u = escapes[is_u]
    saved[is_u] += 4 + (_HIGH_1[data[u + 2]] & _HIGH_2[data[u + 3]])
    owner = np.searchsorted(ends, escapes, side="right")
    return np.bincount(owner, weights=saved, minlength=n).astype(np.int64)
