"""Review lines straight to Arrow columns: a strict JSON lines reader compiled with numba.

Ingest reads eight fields of each review (READ_SCHEMA_LENGTHS) and keeps only the length of its
text. msgspec decodes a line fast, but into a Python object per review and per field, and building
the Arrow columns from those objects then cost more than the decoding (2026-12-03, one thread:
1.31 us a review to decode, 1.54 us to build the columns, 0.36 us to find the newlines). This
module walks a block's bytes once and writes the columns directly: no Python object per review.

It accepts a block only when every line is exactly one JSON object that it can read without
doubt, and then gives what msgspec's reading gives (tests/test_fastjson.py compares them):

- the whole line is checked as JSON (RFC 8259): the grammar, every string's escapes, control
  characters and UTF-8 (surrogates and overlong forms refused), \\u surrogate pairs, nesting;
- the fields ingest reads have their types (a number for ``rating``, an integer of at most 18
  digits for ``timestamp`` and ``helpful_vote``, true/false, strings without escapes for the
  product and user ids, a string for ``text``), or are null or missing; a repeated key keeps its
  last value, as msgspec does;
- ``rating`` is a plain decimal of at most 15 significant digits (``4.0``, ``5``), read exactly:
  the digits as an integer divided by a power of ten, both exact in a double (a correctly
  rounded division, as a full parser gives);
- a line is ``{...}`` with nothing around it but ``\\r`` before its newline.

Anything else (a refused line, a blank line, an exponent, an escaped id, a deeper nesting than
64) makes it decline the whole block, which is then read as before by msgspec (reading.py),
which also names the reason of each refused line. Declining is always safe; accepting only what
msgspec accepts, with the same values, is what the tests check.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

#: The fields read, in READ_SCHEMA_LENGTHS order but the text, which comes last.
FIELDS = ("rating", "asin", "parent_asin", "user_id", "timestamp", "helpful_vote",
          "verified_purchase", "text")
_RATING, _ASIN, _PARENT, _USER, _TS, _VOTE, _VERIFIED, _TEXT = range(8)
_KEY_BYTES = np.frombuffer(b"".join(k.encode() for k in FIELDS), np.uint8)
_KEY_OFFSETS = np.cumsum([0] + [len(k) for k in FIELDS]).astype(np.int64)
_MAX_DEPTH = 64
_POW10 = np.array([10.0 ** k for k in range(23)])
#: Bytes that stand for themselves in a JSON string: printable ASCII but the quote and backslash.
_PLAIN = np.zeros(256, np.uint8)
_PLAIN[32:128] = 1
_PLAIN[[34, 92]] = 0

# Status codes of _parse; anything but _OK declines the block.
_OK, _DECLINE = 0, 1


@nb.njit(cache=True, nogil=True)
def _ws(d: np.ndarray, i: int, n: int) -> int:
    """Past spaces, tabs and carriage returns (a newline ends the line: not skipped here)."""
    while i < n:
        c = d[i]
        if c != 32 and c != 9 and c != 13:
            return i
        i += 1
    return i


@nb.njit(cache=True, nogil=True)
def _hex4(d: np.ndarray, i: int, n: int) -> int:
    """The value of four hex digits at ``i``, or -1."""
    if i + 4 > n:
        return -1
    v = 0
    for k in range(4):
        c = d[i + k]
        if 48 <= c <= 57:
            h = c - 48
        elif 97 <= c <= 102:
            h = c - 87
        elif 65 <= c <= 70:
            h = c - 55
        else:
            return -1
        v = v * 16 + h
    return v


@nb.njit(cache=True, nogil=True)
def _string(d: np.ndarray, i: int, n: int) -> tuple[int, int, bool]:
    """A string whose opening quote is at ``i``: (the index after its closing quote, or -1 when
    it is not valid JSON text; its length in code points; whether it holds an escape)."""
    i += 1
    chars = 0
    escaped = False
    while i < n:
        j = i
        while j < n and _PLAIN[d[j]]:  # (8 bytes at a time was slower: most runs are short)
            j += 1
        chars += j - i
        i = j
        if i >= n:
            break
        c = d[i]
        if c == 34:  # "
            return i + 1, chars, escaped
        if c == 92:  # backslash
            escaped = True
            if i + 1 >= n:
                return -1, 0, escaped
            e = d[i + 1]
            if e == 117:  # u
                v = _hex4(d, i + 2, n)
                if v < 0:
                    return -1, 0, escaped
                if 0xD800 <= v <= 0xDBFF:  # a high surrogate: its low one must follow
                    if i + 7 >= n or d[i + 6] != 92 or d[i + 7] != 117:
                        return -1, 0, escaped
                    w = _hex4(d, i + 8, n)
                    if not 0xDC00 <= w <= 0xDFFF:
                        return -1, 0, escaped
                    i += 12
                elif 0xDC00 <= v <= 0xDFFF:  # a low surrogate alone
                    return -1, 0, escaped
                else:
                    i += 6
            elif (e == 34 or e == 92 or e == 47 or e == 98 or e == 102 or e == 110
                  or e == 114 or e == 116):
                i += 2
            else:
                return -1, 0, escaped
            chars += 1
        elif c < 128:  # a control character (must be escaped)
            return -1, 0, escaped
        else:  # UTF-8: the shortest form of a code point that is not a surrogate
            if 0xC2 <= c <= 0xDF:
                k, lo, hi = 1, 0x80, 0xBF
            elif c == 0xE0:
                k, lo, hi = 2, 0xA0, 0xBF
            elif c == 0xED:
                k, lo, hi = 2, 0x80, 0x9F
            elif 0xE1 <= c <= 0xEF:
                k, lo, hi = 2, 0x80, 0xBF
            elif c == 0xF0:
                k, lo, hi = 3, 0x90, 0xBF
            elif c == 0xF4:
                k, lo, hi = 3, 0x80, 0x8F
            elif 0xF1 <= c <= 0xF3:
                k, lo, hi = 3, 0x80, 0xBF
            else:
                return -1, 0, escaped
            if i + k >= n:
                return -1, 0, escaped
            b = d[i + 1]
            if b < lo or b > hi:
                return -1, 0, escaped
            for j in range(2, k + 1):
                b = d[i + j]
                if b < 0x80 or b > 0xBF:
                    return -1, 0, escaped
            i += k + 1
            chars += 1
    return -1, 0, escaped


@nb.njit(cache=True, nogil=True)
def _number(d: np.ndarray, i: int, n: int) -> tuple[int, int, int, float]:
    """A number at ``i``: (the index after it, or -1 when it is not a JSON number; its kind: 1 an
    integer of at most 18 digits, 2 a plain decimal of at most 15 significant digits, 0 any other
    valid number; the integer; the decimal's value)."""
    neg = False
    if d[i] == 45:  # -
        neg = True
        i += 1
    if i >= n:
        return -1, 0, 0, 0.0
    digits = 0
    mantissa = 0
    c = d[i]
    if c == 48:  # a leading zero stands alone
        i += 1
        digits = 1
    elif 49 <= c <= 57:
        while i < n and 48 <= d[i] <= 57:
            if digits < 19:
                mantissa = mantissa * 10 + (d[i] - 48)
            digits += 1
            i += 1
    else:
        return -1, 0, 0, 0.0
    kind = 1 if digits <= 18 else 0
    sig = digits
    frac = 0
    if i < n and d[i] == 46:  # .
        i += 1
        if i >= n or not 48 <= d[i] <= 57:
            return -1, 0, 0, 0.0
        while i < n and 48 <= d[i] <= 57:
            if sig < 19:
                mantissa = mantissa * 10 + (d[i] - 48)
            sig += 1
            frac += 1
            i += 1
        kind = 2 if sig <= 15 else 0
    if i < n and (d[i] == 101 or d[i] == 69):  # e E
        i += 1
        if i < n and (d[i] == 43 or d[i] == 45):
            i += 1
        if i >= n or not 48 <= d[i] <= 57:
            return -1, 0, 0, 0.0
        while i < n and 48 <= d[i] <= 57:
            i += 1
        kind = 0
    if kind == 1:
        value = -mantissa if neg else mantissa
        return i, 1, value, float(value)
    if kind == 2:
        # Both exact in a double (< 2**53 and 10**22): one correctly rounded division.
        x = float(mantissa) / _POW10[frac]
        return i, 2, 0, -x if neg else x
    return i, 0, 0, 0.0


@nb.njit(cache=True, nogil=True)
def _literal(d: np.ndarray, i: int, n: int) -> tuple[int, int]:
    """``true``, ``false`` or ``null`` at ``i``: (the index after it or -1; 1, 0 or -1)."""
    if i + 4 <= n and d[i] == 116 and d[i + 1] == 114 and d[i + 2] == 117 and d[i + 3] == 101:
        return i + 4, 1
    if (i + 5 <= n and d[i] == 102 and d[i + 1] == 97 and d[i + 2] == 108 and d[i + 3] == 115
            and d[i + 4] == 101):
        return i + 5, 0
    if i + 4 <= n and d[i] == 110 and d[i + 1] == 117 and d[i + 2] == 108 and d[i + 3] == 108:
        return i + 4, -1
    return -1, 0


@nb.njit(cache=True, nogil=True)
def _member_key(d: np.ndarray, i: int, n: int) -> int:
    """Past the key of an object member at ``i`` (a string) and its colon, or -1."""
    if i >= n or d[i] != 34:
        return -1
    i = _string(d, i, n)[0]
    if i < 0:
        return -1
    i = _ws(d, i, n)
    if i >= n or d[i] != 58:  # :
        return -1
    return i + 1


@nb.njit(cache=True, nogil=True)
def _skip(d: np.ndarray, i: int, n: int, stack: np.ndarray) -> int:
    """Past the JSON value at ``i`` (checked, not kept), or -1. ``stack``: room for _MAX_DEPTH
    open containers (1: an object, 2: an array)."""
    depth = 0
    while True:
        # A value.
        i = _ws(d, i, n)
        if i >= n:
            return -1
        c = d[i]
        if c == 123 or c == 91:  # { [
            if depth == _MAX_DEPTH:
                return -1
            stack[depth] = 1 if c == 123 else 2
            depth += 1
            i = _ws(d, i + 1, n)
            if i >= n:
                return -1
            if d[i] == (125 if c == 123 else 93):  # empty
                i += 1
                depth -= 1
            elif c == 123:
                i = _member_key(d, i, n)
                if i < 0:
                    return -1
                continue
            else:
                continue
        elif c == 34:
            i = _string(d, i, n)[0]
        elif c == 45 or 48 <= c <= 57:
            i = _number(d, i, n)[0]
        else:
            i = _literal(d, i, n)[0]
        if i < 0:
            return -1
        # After a value: close containers, or go on to the next member or element.
        while True:
            if depth == 0:
                return i
            i = _ws(d, i, n)
            if i >= n:
                return -1
            c = d[i]
            top = stack[depth - 1]
            if c == 44:  # ,
                i = _ws(d, i + 1, n)
                if top == 1:
                    i = _member_key(d, i, n)
                    if i < 0:
                        return -1
                break
            if (top == 1 and c == 125) or (top == 2 and c == 93):
                i += 1
                depth -= 1
                continue
            return -1


@nb.njit(cache=True, nogil=True)
def _which(d: np.ndarray, start: int, end: int, keys: np.ndarray, offsets: np.ndarray) -> int:
    """The field whose name is ``d[start:end]`` (a key without escapes), or -1."""
    size = end - start
    for f in range(len(offsets) - 1):
        lo = offsets[f]
        if offsets[f + 1] - lo != size:
            continue
        same = True
        for k in range(size):
            if d[start + k] != keys[lo + k]:
                same = False
                break
        if same:
            return f
    return -1


@nb.njit(cache=True, nogil=True)
def _parse(d: np.ndarray, keys: np.ndarray, offsets: np.ndarray, floats: np.ndarray,
           ints: np.ndarray, ids: np.ndarray, id_ends: np.ndarray, present: np.ndarray) -> int:
    """Every line of ``d`` into the column arrays (field-major; ``present[f, r]`` is 0 where
    field f of row r is null or missing); returns _OK or _DECLINE. ``floats``: rating;
    ``ints[0..3]``: timestamp, helpful_vote, verified_purchase (0/1), the text's length in code
    points; asin, parent_asin and user_id are copied into ``ids[0..2]`` (as read: an id without
    escapes is its bytes), row r's at ``id_ends[c, r]:id_ends[c, r + 1]`` -- while the line is
    in the cache: gathering them afterwards cost a cache miss a row."""
    n = len(d)
    rows = len(floats)
    stack = np.empty(_MAX_DEPTH, np.uint8)
    fill = np.zeros(3, np.int64)
    i = 0
    row = 0
    while i < n:
        if d[i] != 123 or row >= rows:  # a line starts with {
            return _DECLINE
        id_ends[:, row] = fill
        i = _ws(d, i + 1, n)
        if i < n and d[i] == 125:
            i += 1
        else:
            while True:
                if i >= n or d[i] != 34:
                    return _DECLINE
                key_start = i + 1
                i, _chars, escaped = _string(d, i, n)
                if i < 0 or escaped:
                    return _DECLINE
                f = _which(d, key_start, i - 1, keys, offsets)
                i = _ws(d, i, n)
                if i >= n or d[i] != 58:  # :
                    return _DECLINE
                i = _ws(d, i + 1, n)
                if i >= n:
                    return _DECLINE
                c = d[i]
                if f < 0:
                    i = _skip(d, i, n, stack)
                elif c == 110:  # null
                    i, _flag = _literal(d, i, n)
                    present[f, row] = 0
                    if _ASIN <= f <= _USER:  # a repeated key: the last value stands
                        fill[f - _ASIN] = id_ends[f - _ASIN, row]
                elif f == _RATING:
                    if not (c == 45 or 48 <= c <= 57):
                        return _DECLINE
                    i, kind, whole, x = _number(d, i, n)
                    # A plain decimal, or an integer exact in a double.
                    if kind == 0 or (kind == 1 and not -2**53 < whole < 2**53):
                        return _DECLINE
                    floats[row] = x
                    present[f, row] = 1
                elif f == _TS or f == _VOTE:
                    if not (c == 45 or 48 <= c <= 57):
                        return _DECLINE
                    i, kind, whole, x = _number(d, i, n)
                    if kind != 1:
                        return _DECLINE
                    ints[f - _TS, row] = whole
                    present[f, row] = 1
                elif f == _VERIFIED:
                    i, flag = _literal(d, i, n)
                    if flag < 0:
                        return _DECLINE
                    ints[2, row] = flag
                    present[f, row] = 1
                else:  # a string: an id, or the text
                    if c != 34:
                        return _DECLINE
                    start = i + 1
                    i, chars, escaped = _string(d, i, n)
                    if f == _TEXT:
                        ints[3, row] = chars
                    elif escaped:
                        return _DECLINE
                    else:
                        col = f - _ASIN
                        at = id_ends[col, row]
                        for k in range(i - 1 - start):
                            ids[col, at + k] = d[start + k]
                        fill[col] = at + i - 1 - start
                    present[f, row] = 1
                if i < 0:
                    return _DECLINE
                i = _ws(d, i, n)
                if i >= n:
                    return _DECLINE
                if d[i] == 44:  # ,
                    i = _ws(d, i + 1, n)
                    continue
                if d[i] == 125:  # }
                    i += 1
                    break
                return _DECLINE
        # The line's end: } then \n, or }\r\n, or the end of the data.
        if i < n and d[i] == 13:
            i += 1
            if i >= n or d[i] != 10:
                return _DECLINE
        if i < n:
            if d[i] != 10:
                return _DECLINE
            i += 1
        row += 1
        id_ends[:, row] = fill
    return _OK if row == rows else _DECLINE


@nb.njit(cache=True, nogil=True)
def _count_lines(d: np.ndarray) -> int:
    count = 0
    for c in d:
        count += c == 10
    if len(d) and d[len(d) - 1] != 10:
        count += 1
    return count


def _column(values: np.ndarray, present: np.ndarray, type_: pa.DataType) -> pa.Array:
    if present.all():
        return pa.array(values, type_)
    return pa.array(values, type_, mask=~present)


def _strings(data: np.ndarray, ends: np.ndarray, present: np.ndarray) -> pa.Array:
    """An id column from its bytes and the row ends (int64, from 0)."""
    rows = len(present)
    large = ends[-1] >= 2**31
    valid = present.astype(bool)
    bitmap = None if valid.all() else pa.array(valid).buffers()[1]
    arr = pa.Array.from_buffers(
        pa.large_string() if large else pa.string(), rows,
        [bitmap, pa.py_buffer(ends if large else ends.astype(np.int32)),
         pa.py_buffer(data[:ends[-1]])], null_count=rows - int(valid.sum()))
    return arr.cast(pa.string()) if large else arr


def read_lines(piece: bytes | memoryview, schema: pa.Schema) -> pa.Table | None:
    """The lines of ``piece`` (whole JSON lines, the last one's newline optional) as a table of
    ``schema`` (READ_SCHEMA_LENGTHS), line i as row i; None where any line is not one it can read
    without doubt (module doc): the caller then reads the block with msgspec."""
    d = np.frombuffer(piece, np.uint8)
    rows = _count_lines(d)
    floats = np.zeros(rows, np.float64)
    ints = np.zeros((4, rows), np.int64)
    ids = np.empty((3, len(d)), np.uint8)  # pages only where written
    id_ends = np.zeros((3, rows + 1), np.int64)
    present = np.zeros((8, rows), np.uint8)
    if _parse(d, _KEY_BYTES, _KEY_OFFSETS, floats, ints, ids, id_ends, present) != _OK:
        return None
    if (ints[3] >= 2**31).any():  # a text too long for int32 (msgspec's path says so)
        return None
    has = present.astype(bool)
    columns = {
        "rating": _column(floats, has[_RATING], pa.float64()),
        "asin": _strings(ids[0], id_ends[0], present[_ASIN]),
        "parent_asin": _strings(ids[1], id_ends[1], present[_PARENT]),
        "user_id": _strings(ids[2], id_ends[2], present[_USER]),
        "timestamp": _column(ints[0], has[_TS], pa.int64()),
        "helpful_vote": _column(ints[1], has[_VOTE], pa.int64()),
        "verified_purchase": _column(ints[2].astype(bool), has[_VERIFIED], pa.bool_()),
        "text_chars": _column(ints[3].astype(np.int32), has[_TEXT], pa.int32()),
    }
    return pa.table([columns[name] for name in schema.names], schema=schema)
