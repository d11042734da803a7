"""resourced: reach a virtual machine's consoles and sound over its one VNC connection.

The package root is the domain core. `resourced.rfb` is the VNC protocol (sans-IO
plus one asyncio transport), `resourced.sinks` are the places resources go to.
"""

from resourced.errors import ResourcedError

__all__ = ["ResourcedError"]
__version__ = "0.1.0"
