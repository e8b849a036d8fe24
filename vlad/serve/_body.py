"""Request bodies -> image files: the content types accepted, and a multipart reader over a body in memory."""

from __future__ import annotations

from dataclasses import dataclass

#: raw bodies holding one image file (the decoder recognises the format from the bytes, not from this)
RAW_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/bmp", "image/x-ms-bmp", "image/tiff", "image/webp",
             "image/x-portable-anymap", "image/x-portable-graymap", "image/x-portable-pixmap",
             "image/x-portable-bitmap", "image/gif", "application/octet-stream")
MULTIPART = "multipart/form-data"
#: the ASGI scope key of a body read whole before the app (by the Ray Serve proxy's middleware, which sends
#: it to the replica with the request); the app reads it instead of the request's body stream
BODY_SCOPE_KEY = "vlad.body"
#: the ASGI scope key of the wall-clock time (``time.time()``) the request reached that proxy: the app's
#: timeout counts from it, so the time spent reading the body there counts too
ARRIVED_SCOPE_KEY = "vlad.arrived"


class BodyError(Exception):
    """A body that cannot be taken apart; ``kind`` and ``status`` say how to answer it."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


@dataclass
class Part:
    """One file of a multipart body."""

    name: str
    data: bytes


def media_type(content_type: str | None) -> str:
    """``"image/png; charset=x"`` -> ``"image/png"``; a missing header reads as application/octet-stream."""
    if not content_type or not content_type.strip():
        return "application/octet-stream"
    return content_type.split(";", 1)[0].strip().lower()


def split_multipart(content_type: str, body: bytes, max_files: int) -> list[Part]:
    """The file parts of a ``multipart/form-data`` body, in order (text fields are ignored).

    Raises:
        BodyError: 400 for a malformed or truncated body or one without a file, 413 for more than
            ``max_files`` files.
    """
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BodyError(400, "bad_multipart", "a multipart/form-data body needs a boundary in its Content-Type header")
    parts: list[Part] = []
    state = {"field": bytearray(), "value": bytearray(), "headers": {}, "data": bytearray(), "ended": False,
             "files": 0}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][bytes(state["field"]).strip().lower()] = bytes(state["value"]).strip()
        state["field"], state["value"] = bytearray(), bytearray()

    def on_part_begin():
        state["headers"], state["data"] = {}, bytearray()

    def on_part_data(data, start, end):
        state["data"] += data[start:end]

    def on_part_end():
        disposition, options = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if b"filename" not in options:  # a text field (e.g. map=png sent as a form field): not an image
            return
        state["files"] += 1
        if state["files"] > max_files:
            raise BodyError(413, "too_many_images",
                            f"more than {max_files} images in one request; send at most {max_files} per request")
        name = options[b"filename"].decode("utf-8", "replace") or f"part{len(parts)}"
        parts.append(Part(name, bytes(state["data"])))

    def on_end():
        state["ended"] = True

    callbacks = {"on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_part_begin": on_part_begin, "on_part_data": on_part_data,
                 "on_part_end": on_part_end, "on_end": on_end}
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise BodyError(400, "bad_multipart", f"the multipart body cannot be read ({exc})") from None
    if not state["ended"]:
        raise BodyError(400, "bad_multipart", "the multipart body is truncated (no closing boundary)")
    if not parts:
        raise BodyError(400, "bad_multipart", "the multipart body holds no file; send images as file parts "
                                              "(curl -F image=@part.png)")
    return parts
