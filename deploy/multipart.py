"""A small, strict ``multipart/form-data`` parser (RFC 7578) for already-size-limited bodies.

FastAPI's own form parsing needs the `python-multipart` package; this parser needs nothing and
keeps the file bytes as slices of the request body. Malformed input raises `MultipartError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_\-*]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data."""


@dataclass(frozen=True)
class Part:
    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """``'form-data; name="file"; filename="a.jpg"'`` -> (``'form-data'``, {name, filename})."""
    main, _, rest = value.partition(";")
    params = {}
    for key, raw in _PARAM_RE.findall(";" + rest):
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[key.lower()] = raw
    return main.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    kind, params = header_params(content_type)
    if kind != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {kind!r}")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 200:
        raise MultipartError("the Content-Type header has no valid boundary parameter")
    return boundary.encode("latin-1")


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """All parts of a multipart/form-data body, in order."""
    delim = b"--" + boundary_of(content_type)
    start = body.find(delim)
    if start < 0:
        raise MultipartError("the body does not contain the boundary named in Content-Type")
    parts: list[Part] = []
    pos = start + len(delim)
    while True:
        if body.startswith(b"--", pos):  # closing delimiter
            return parts
        if not body.startswith(b"\r\n", pos):
            raise MultipartError("malformed boundary line")
        pos += 2
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise MultipartError("a part has no end of headers")
        headers: dict[str, str] = {}
        for line in body[pos:head_end].split(b"\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                raise MultipartError(f"malformed part header {line[:60]!r}")
            headers[name.strip().decode("latin-1").lower()] = value.strip().decode("utf-8", "replace")
        data_start = head_end + 4
        nxt = body.find(b"\r\n" + delim, data_start)
        if nxt < 0:
            raise MultipartError("the body ends before the closing boundary (truncated upload?)")
        disposition, params = header_params(headers.get("content-disposition", ""))
        if disposition != "form-data":
            raise MultipartError("a part has no 'Content-Disposition: form-data' header")
        parts.append(Part(params.get("name"), params.get("filename"),
                          headers.get("content-type"), body[data_start:nxt]))
        pos = nxt + 2 + len(delim)


def encode_multipart(files: list[tuple[str, str, bytes, str]], boundary: str = "tlpipe-boundary-7d41"
                     ) -> tuple[bytes, str]:
    """(field, filename, data, content type) tuples -> (body, Content-Type header). For clients."""
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    chunks = []
    for field, filename, data, ctype in files:
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name={quoted(field)}; filename={quoted(filename)}\r\n"
            f"Content-Type: {ctype}\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
