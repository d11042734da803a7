"""The host-side gateway: adds the console extension in front of an unmodified QEMU VNC server."""
