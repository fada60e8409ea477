"""Framing between the worker and a sandbox's guest server.

Standard library only, and no imports at all: this module runs inside
containers under the image's Python, where every import is paid on each
fresh start, as well as in the worker.

A request is a 4-byte big-endian length and that many bytes of event JSON.
A reply is one status byte, a 4-byte big-endian length and the payload:
REPLY_OK carries the handler's result as JSON; REPLY_ERROR carries a JSON
object {"error", "message", "traceback"} describing why there is no result.
The worker passes result bytes through to HTTP untouched, so a warm request
costs no JSON work on the host beyond validating the request body.
"""

REPLY_OK = 0
REPLY_ERROR = 1

HEAD_SIZE = 4
REPLY_HEAD_SIZE = 5

# A frame larger than this is refused; it bounds what a misbehaving peer
# can make the other side allocate.
MAX_FRAME = 256 << 20


class ProtocolError(Exception):
    """The peer sent something that is not a frame, or hung up mid-frame."""


def recv_exact(sock, size):
    """Read exactly size bytes; b"" if the peer closed before the first."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return b""
            raise ProtocolError(f"peer closed after {got} of {size} bytes")
        got += n
    return buffer


def check_size(size, what):
    if size > MAX_FRAME:
        raise ProtocolError(f"{what} of {size} bytes exceeds {MAX_FRAME}")


def encode_request(body):
    return len(body).to_bytes(HEAD_SIZE, "big") + body


def recv_request(sock):
    """The next request body, or None when the peer closed cleanly."""
    frame = recv_frame(sock, HEAD_SIZE, "request")
    if frame is None:
        return None
    return frame[1]


def encode_reply(status, payload):
    head = bytes((status,)) + len(payload).to_bytes(HEAD_SIZE, "big")
    return head + payload


def recv_reply(sock):
    """(status, payload) of the next reply; raises if the peer closed."""
    frame = recv_frame(sock, REPLY_HEAD_SIZE, "reply")
    if frame is None:
        raise ProtocolError("sandbox closed the connection")
    head, payload = frame
    return head[0], payload


def recv_frame(sock, head_size, what, first_read=65536):
    """(head, payload) of the next frame, whose last four head bytes are
    the payload length; None if the peer closed before sending any.

    PERF: one recv usually brings the whole frame, so the head is not
    read on its own. Each side sends one frame and waits for the answer,
    so nothing past the frame can arrive in the same read.
    """
    data = sock.recv(first_read)
    if not data:
        return None
    while len(data) < head_size:
        more = sock.recv(first_read)
        if not more:
            raise ProtocolError(f"peer closed mid-{what} header")
        data += more
    size = int.from_bytes(data[head_size - HEAD_SIZE : head_size], "big")
    check_size(size, what)
    end = head_size + size
    if len(data) > end:
        raise ProtocolError(f"{len(data) - end} bytes after a {what}")
    if len(data) < end:
        rest = recv_exact(sock, end - len(data))
        if not rest:
            raise ProtocolError(f"peer closed mid-{what}")
        data += rest
    return data[:head_size], bytes(data[head_size:end])
