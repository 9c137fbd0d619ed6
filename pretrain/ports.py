"""A free local TCP port for a rendezvous (torch.distributed's MASTER_PORT, the deepspeed launcher's --master_port)."""

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 right now; the caller hands it to the process that opens it next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
