"""The demo/test guest: a tiny boot sector run under real QEMU.

Used by the README's run command and by the integration tests, so that both
talk to a real VNC server with a real serial console and a real PC-speaker
tone. It is not part of resourced's service proper: nothing in the service
imports it.

`bootsector` builds the guest's 512-byte boot sector; `qemu` runs it.
"""
