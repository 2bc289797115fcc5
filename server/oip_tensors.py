"""Open Inference Protocol tensors on the wire: their JSON form, and Triton's binary tensor data
extension, which `tritonclient`'s defaults use (InferInput.set_data_from_numpy, outputs not named).

The extension: a request whose `Inference-Header-Content-Length` header is N carries its JSON in the
body's first N bytes, then each binary input's bytes in input order (input.parameters.binary_data_size
of them). A BYTES tensor's elements are each a 4-byte little-endian length followed by the bytes; FP32
and INT32 are little-endian. An output asked for in binary (request parameters.binary_data_output, or
the output's parameters.binary_data) carries parameters.binary_data_size instead of `data`, its bytes
follow the response's JSON header, whose length the response's Inference-Header-Content-Length gives.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
from fastapi import Request, Response
from fastapi.routing import APIRoute

from exitserve.server.errors import APIError, InvalidBinaryBody

HEADER_LENGTH = "inference-header-content-length"
NUMPY = {"FP32": "<f4", "INT32": "<i4"}


class BinaryTensorRequest(Request):
    """A request that may carry binary tensors: `body()` is its JSON header only (what FastAPI parses),
    `tail` the binary data after it."""

    tail = b""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            raw = await super().body()
            declared = self.headers.get(HEADER_LENGTH)
            if declared is not None:
                if not declared.isdigit() or int(declared) > len(raw):
                    raise InvalidBinaryBody(f"{HEADER_LENGTH}: {declared[:20]!r} is not a length within the "
                                            f"body's {len(raw)} bytes")
                self._body, self.tail = raw[: int(declared)], raw[int(declared):]
        return self._body


class BinaryTensorRoute(APIRoute):
    """A route whose endpoint gets a BinaryTensorRequest (FastAPI's documented custom-request pattern)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(BinaryTensorRequest(request.scope, request.receive))

        return route


def decode_bytes(raw: bytes, where: str) -> list[str]:
    """A binary BYTES tensor's elements (length-prefixed), decoded as UTF-8 text."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise APIError.of("validation_error", f"{where}: binary BYTES data ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, offset)
        element = raw[offset + 4: offset + 4 + size]
        if len(element) != size:
            raise APIError.of("validation_error", f"{where}: binary BYTES element {len(out)} is cut short")
        try:
            out.append(element.decode())
        except UnicodeDecodeError as exc:
            raise APIError.of("validation_error", f"{where}: element {len(out)} is not valid UTF-8 text") from exc
        offset += 4 + size
    return out


@dataclass
class Tensor:
    name: str
    datatype: str  # BYTES, FP32 or INT32
    shape: list[int]
    data: list  # flat, row-major

    def binary(self) -> bytes:
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in self.data))
        return np.asarray(self.data, dtype=NUMPY[self.datatype]).tobytes()


def encode_response(header: dict, tensors: list[Tensor], binary: set[str], headers: dict[str, str]) -> Response:
    """The response: JSON, or (when some outputs are asked for in binary) its JSON header and their bytes."""
    outputs, tail = [], []
    for t in tensors:
        out = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary:
            tail.append(t.binary())
            out["parameters"] = {"binary_data_size": len(tail[-1])}
        else:
            out["data"] = t.data
        outputs.append(out)
    body = json.dumps({**header, "outputs": outputs}, separators=(",", ":"), allow_nan=False).encode()
    if not tail:
        return Response(body, media_type="application/json", headers=headers)
    return Response(body + b"".join(tail), media_type="application/octet-stream",
                    headers={**headers, HEADER_LENGTH: str(len(body))})
