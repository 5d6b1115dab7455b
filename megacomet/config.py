"""What a worker is told at start: a frozen copy of the settings, built once by the supervisor.

Workers never see the argparse namespace (which the supervisor fills in and
changes); they read only this, and nothing here changes after start.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    host: str
    port: int                   # the real port (0 on the command line is resolved first)
    compat_ports: int           # also listen on port+1 .. port+compat_ports (the original's)
    app_host: str
    app_port: int
    max_message: int
    max_body: int
    header_timeout: float
    poll_timeout: int
    heartbeat: float            # seconds between keep-alive pings on streams
    queue_ttl: float
    cors_origin: str
    app_token: str | None
    secret: bytes | None
    worker_timeout: float
    log_format: str
    started_at: float           # unix time, for /stats uptime
    # Who is connecting (defaults: off; a Config built without them is the plain server).
    proxy_protocol: bool = False        # client port: a PROXY protocol header opens each one
    max_conns_per_ip: int = 0           # client connections per address and worker (0: no cap)
    app_server_names: tuple = ()        # Host names the app port answers besides its address
    # TLS on the client port (both or neither): absolute paths, read by each worker at its start.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Cluster mode: the Redis URLs (none: one box), and how it is used (``cluster``).
    redis: tuple = ()
    redis_timeout: float = 2.0
    redis_wait_replicas: int = 0

    @classmethod
    def from_args(cls, args, **resolved):
        """The settings in ``args``, with ``resolved`` ones (real ports, start time) over them."""
        values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
        values.update(resolved)
        return cls(**values)
