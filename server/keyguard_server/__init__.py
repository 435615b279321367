"""keyguard's server: the gRPC services over the domain and its storage."""

from keyguard_server._config import Config
from keyguard_server._server import KeyguardServer, run, serve

__all__ = ["Config", "KeyguardServer", "run", "serve"]
