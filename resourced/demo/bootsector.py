"""The demo guest's 512-byte x86 real-mode boot sector, assembled by Python.

What the guest does, in order: set up its segments and stack, start a
continuous square tone on the PC speaker (PIT channel 2), initialise COM1 at
115200 8N1 with its FIFO on, write a banner to COM1 and to the VGA text screen
(BIOS teletype), then echo every byte that arrives on COM1 back to COM1, forever.

The machine code is hand-encoded here so the project needs no assembler; every
instruction carries its mnemonic in a comment. The small `_Assembler` helper
only resolves labels (jump displacements and absolute addresses): it encodes
no instructions.

This is not a general-purpose assembler, nor a guest meant to do anything but
give the tests and the README's demo a real VNC screen, serial console and tone.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_BANNER_LENGTH",
    "MAX_TONE_HZ",
    "MIN_TONE_HZ",
    "PIT_HZ",
    "build_boot_sector",
    "pit_divisor",
    "tone_frequency",
]

PIT_HZ: Final = 1193182
"""Input clock of the 8253/8254 PIT on a PC, in Hz."""

# Below 20 Hz the divisor would no longer fit the PIT's 16-bit counter
# (1193182 / 18.2 Hz = 65536) and the tone would be inaudible anyway; above
# 20 kHz nobody hears it and QEMU's speaker emulation aliases it.
MIN_TONE_HZ: Final = 20
MAX_TONE_HZ: Final = 20000

DEFAULT_BANNER: Final = b"resourced demo guest\r\n"

_LOAD_ADDRESS: Final = 0x7C00  # where every PC BIOS loads a boot sector
_SECTOR_SIZE: Final = 512
_SIGNATURE: Final = b"\x55\xaa"

_COM1: Final = 0x3F8
_COM1_IER: Final = _COM1 + 1  # interrupt enable (divisor high byte while DLAB=1)
_COM1_FCR: Final = _COM1 + 2  # FIFO control
_COM1_LCR: Final = _COM1 + 3  # line control
_COM1_MCR: Final = _COM1 + 4  # modem control
_COM1_LSR: Final = _COM1 + 5  # line status
_IRQ4_VECTOR_ADDRESS: Final = 0x0C * 4  # COM1 is IRQ4 = INT 0x0C on the master PIC


def _lo(value: int) -> int:
    return value & 0xFF


def _hi(value: int) -> int:
    return (value >> 8) & 0xFF


class _Assembler:
    """Collects hand-encoded bytes and patches label references once all are known."""

    def __init__(self, origin: int) -> None:
        self._origin = origin
        self._code = bytearray()
        self._labels: dict[str, int] = {}
        # (position in code, label, kind) where kind is "rel8", "rel16" or "abs16".
        self._fixups: list[tuple[int, str, str]] = []

    def op(self, *data: int) -> None:
        """Append literal bytes (opcode, ModR/M, immediates)."""
        self._code.extend(data)

    def word(self, value: int) -> None:
        """Append a little-endian 16-bit immediate."""
        self._code.extend((_lo(value), _hi(value)))

    def label(self, name: str) -> None:
        if name in self._labels:
            raise AssertionError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)

    def rel8(self, name: str) -> None:
        """A signed 8-bit displacement from the end of this byte to `name`."""
        self._fixups.append((len(self._code), name, "rel8"))
        self._code.append(0)

    def rel16(self, name: str) -> None:
        """A 16-bit displacement from the end of these two bytes to `name`."""
        self._fixups.append((len(self._code), name, "rel16"))
        self._code.extend(b"\0\0")

    def abs16(self, name: str) -> None:
        """The absolute 16-bit address of `name` (segment 0, so offset = linear address)."""
        self._fixups.append((len(self._code), name, "abs16"))
        self._code.extend(b"\0\0")

    def data(self, blob: bytes) -> None:
        self._code.extend(blob)

    def finish(self) -> bytes:
        code = self._code
        for position, name, kind in self._fixups:
            target = self._labels[name]
            if kind == "rel8":
                displacement = target - (position + 1)
                if not -128 <= displacement <= 127:
                    raise AssertionError(f"short jump to {name!r} out of range")
                code[position] = displacement & 0xFF
            elif kind == "rel16":
                displacement = (target - (position + 2)) & 0xFFFF
                code[position : position + 2] = displacement.to_bytes(2, "little")
            else:
                address = self._origin + target
                code[position : position + 2] = address.to_bytes(2, "little")
        return bytes(code)


def pit_divisor(tone_hz: int) -> int:
    """The PIT channel 2 reload value that comes closest to `tone_hz`."""
    if isinstance(tone_hz, bool) or not isinstance(tone_hz, int):
        raise TypeError(f"tone_hz must be an int, not {type(tone_hz).__name__}")
    if not MIN_TONE_HZ <= tone_hz <= MAX_TONE_HZ:
        raise ValueError(
            f"tone_hz must be between {MIN_TONE_HZ} and {MAX_TONE_HZ} Hz, not {tone_hz}"
        )
    return round(PIT_HZ / tone_hz)


def tone_frequency(tone_hz: int) -> float:
    """The frequency the speaker really plays for `tone_hz`: the PIT divides by an integer."""
    return PIT_HZ / pit_divisor(tone_hz)


def _assemble(banner: bytes, divisor: int) -> bytes:
    """The boot sector's code and banner, without padding or signature."""
    a = _Assembler(_LOAD_ADDRESS)

    # Some BIOSes jump to 07C0:0000, others to 0000:7C00; our absolute
    # addresses assume CS=0, so normalise CS with a far jump first.
    a.op(0xEA)  # jmp far 0000:main
    a.abs16("main")
    a.word(0x0000)
    a.label("main")

    # Segments and stack. Interrupts stay off while SS:SP and the IVT change.
    a.op(0xFA)  # cli
    a.op(0x31, 0xC0)  # xor ax, ax
    a.op(0x8E, 0xD8)  # mov ds, ax
    a.op(0x8E, 0xC0)  # mov es, ax
    a.op(0x8E, 0xD0)  # mov ss, ax
    a.op(0xBC)  # mov sp, 0x7C00  (stack grows down below the boot sector)
    a.word(_LOAD_ADDRESS)
    a.op(0xFC)  # cld  (lodsb walks forwards)

    # Our COM1 interrupt handler, so the echo loop can sleep in `hlt` instead
    # of spinning: a spinning guest costs a whole host core under TCG, and the
    # tests run several guests on a 2-core machine.
    a.op(0xC7, 0x06)  # mov word [0x0030], irq4   (IVT entry 0x0C: offset)
    a.word(_IRQ4_VECTOR_ADDRESS)
    a.abs16("irq4")
    a.op(0xC7, 0x06)  # mov word [0x0032], 0x0000 (IVT entry 0x0C: segment)
    a.word(_IRQ4_VECTOR_ADDRESS + 2)
    a.word(0x0000)
    a.op(0xFB)  # sti  (the BIOS timer and video services need interrupts)

    # PC speaker: PIT channel 2 in mode 3 (square wave) at PIT_HZ / divisor.
    a.op(0xB0, 0xB6)  # mov al, 0xB6  (channel 2, lobyte/hibyte, mode 3, binary)
    a.op(0xE6, 0x43)  # out 0x43, al  (PIT command register)
    a.op(0xB0, _lo(divisor))  # mov al, divisor low byte
    a.op(0xE6, 0x42)  # out 0x42, al  (PIT channel 2 data)
    a.op(0xB0, _hi(divisor))  # mov al, divisor high byte
    a.op(0xE6, 0x42)  # out 0x42, al
    a.op(0xE4, 0x61)  # in al, 0x61   (system control port B)
    a.op(0x0C, 0x03)  # or al, 0x03   (bit 0: gate PIT channel 2, bit 1: speaker data on)
    a.op(0xE6, 0x61)  # out 0x61, al

    # COM1: 115200 baud (divisor 1), 8 data bits, no parity, 1 stop bit.
    a.op(0xBA)  # mov dx, COM1+1 (IER)
    a.word(_COM1_IER)
    a.op(0xB0, 0x00)  # mov al, 0x00  (no UART interrupts while configuring)
    a.op(0xEE)  # out dx, al
    a.op(0xBA)  # mov dx, COM1+3 (LCR)
    a.word(_COM1_LCR)
    a.op(0xB0, 0x80)  # mov al, 0x80  (DLAB=1: ports +0/+1 become the baud divisor)
    a.op(0xEE)  # out dx, al
    a.op(0xBA)  # mov dx, COM1+0 (DLL)
    a.word(_COM1)
    a.op(0xB0, 0x01)  # mov al, 0x01  (divisor low byte: 115200 / 1)
    a.op(0xEE)  # out dx, al
    a.op(0xBA)  # mov dx, COM1+1 (DLM)
    a.word(_COM1_IER)
    a.op(0xB0, 0x00)  # mov al, 0x00  (divisor high byte)
    a.op(0xEE)  # out dx, al
    a.op(0xBA)  # mov dx, COM1+3 (LCR)
    a.word(_COM1_LCR)
    a.op(0xB0, 0x03)  # mov al, 0x03  (8N1, DLAB=0)
    a.op(0xEE)  # out dx, al
    a.op(0xBA)  # mov dx, COM1+2 (FCR)
    a.word(_COM1_FCR)
    # Trigger level 1 byte rather than 14: an echo must not wait for 14 bytes
    # (or for the FIFO's character timeout) before the guest sees input.
    a.op(0xB0, 0x07)  # mov al, 0x07  (FIFO on, clear RX and TX FIFOs, trigger at 1 byte)
    a.op(0xEE)  # out dx, al
    a.op(0xBA)  # mov dx, COM1+4 (MCR)
    a.word(_COM1_MCR)
    a.op(0xB0, 0x0B)  # mov al, 0x0B  (DTR, RTS, OUT2: OUT2 routes the UART IRQ to the PIC)
    a.op(0xEE)  # out dx, al

    # Banner: to COM1 and to the screen, byte by byte. A length rather than a
    # terminator so any byte, NUL included, may appear in the banner.
    a.op(0xBE)  # mov si, banner
    a.abs16("banner")
    a.op(0xB9)  # mov cx, len(banner)
    a.word(len(banner))
    a.op(0xE3)  # jcxz banner_done
    a.rel8("banner_done")
    a.label("banner_next")
    a.op(0xAC)  # lodsb            (al = [ds:si], si += 1)
    a.op(0xE8)  # call putc        (to COM1)
    a.rel16("putc")
    a.op(0x60)  # pusha            (a BIOS may clobber registers)
    a.op(0xB4, 0x0E)  # mov ah, 0x0E     (BIOS teletype output of al)
    a.op(0xBB)  # mov bx, 0x0007   (page 0, light grey in graphics modes)
    a.word(0x0007)
    a.op(0xCD, 0x10)  # int 0x10
    a.op(0x61)  # popa
    a.op(0xE2)  # loop banner_next (cx -= 1, again while cx != 0)
    a.rel8("banner_next")
    a.label("banner_done")

    # Hide the text-mode cursor: a blinking cursor would make two screenshots of
    # the same screen differ by when they were taken.
    a.op(0xB4, 0x01)  # mov ah, 0x01     (BIOS: set cursor shape)
    a.op(0xB9)  # mov cx, 0x2000   (start line bit 5 set: cursor off)
    a.word(0x2000)
    a.op(0xCD, 0x10)  # int 0x10

    # Wake on received data: UART "data available" interrupt, IRQ4 unmasked.
    a.op(0xBA)  # mov dx, COM1+1 (IER)
    a.word(_COM1_IER)
    a.op(0xB0, 0x01)  # mov al, 0x01  (interrupt when received data is available)
    a.op(0xEE)  # out dx, al
    a.op(0xE4, 0x21)  # in al, 0x21   (master PIC interrupt mask)
    a.op(0x24, 0xEF)  # and al, 0xEF  (clear bit 4: unmask IRQ4)
    a.op(0xE6, 0x21)  # out 0x21, al

    # Echo forever. The LSR check runs with interrupts off and `sti; hlt`
    # re-enables them only for the `hlt` (sti takes effect one instruction
    # late), so a byte that arrives after the check still wakes the `hlt`.
    # The BIOS timer (18.2 Hz) would wake it anyway: a lost wake-up only delays.
    a.label("echo")
    a.op(0xFA)  # cli
    a.op(0xBA)  # mov dx, COM1+5 (LSR)
    a.word(_COM1_LSR)
    a.op(0xEC)  # in al, dx
    a.op(0xA8, 0x01)  # test al, 0x01  (bit 0: data ready)
    a.op(0x75)  # jnz echo_byte
    a.rel8("echo_byte")
    a.op(0xFB)  # sti
    a.op(0xF4)  # hlt              (sleep until the next interrupt)
    a.op(0xEB)  # jmp echo
    a.rel8("echo")
    a.label("echo_byte")
    a.op(0xFB)  # sti
    a.op(0xBA)  # mov dx, COM1+0 (RBR)
    a.word(_COM1)
    a.op(0xEC)  # in al, dx        (read the received byte)
    a.op(0xE8)  # call putc        (send it back)
    a.rel16("putc")
    a.op(0xEB)  # jmp echo
    a.rel8("echo")

    # putc: write al to COM1 once its transmit holding register is empty.
    # Preserves every register.
    a.label("putc")
    a.op(0x52)  # push dx
    a.op(0x50)  # push ax          (keep the byte: the LSR read overwrites al)
    a.op(0xBA)  # mov dx, COM1+5 (LSR)
    a.word(_COM1_LSR)
    a.label("putc_wait")
    a.op(0xEC)  # in al, dx
    a.op(0xA8, 0x20)  # test al, 0x20  (bit 5: transmit holding register empty)
    a.op(0x74)  # jz putc_wait
    a.rel8("putc_wait")
    a.op(0x58)  # pop ax
    a.op(0xBA)  # mov dx, COM1+0 (THR)
    a.word(_COM1)
    a.op(0xEE)  # out dx, al
    a.op(0x5A)  # pop dx
    a.op(0xC3)  # ret

    # irq4: the echo loop reads the data itself; the handler only has to
    # acknowledge the interrupt so the PIC delivers the next one.
    a.label("irq4")
    a.op(0x50)  # push ax
    a.op(0xB0, 0x20)  # mov al, 0x20  (non-specific end of interrupt)
    a.op(0xE6, 0x20)  # out 0x20, al  (master PIC command port)
    a.op(0x58)  # pop ax
    a.op(0xCF)  # iret

    a.label("banner")
    a.data(banner)
    return a.finish()


MAX_BANNER_LENGTH: Final = _SECTOR_SIZE - len(_SIGNATURE) - len(_assemble(b"", 1))
"""The longest banner that still fits the boot sector beside the code."""


def build_boot_sector(banner: bytes = DEFAULT_BANNER, tone_hz: int = 440) -> bytes:
    """A 512-byte boot sector that plays `tone_hz`, prints `banner` and echoes COM1.

    Raises ValueError if `tone_hz` is outside MIN_TONE_HZ..MAX_TONE_HZ or the
    banner is longer than MAX_BANNER_LENGTH bytes.
    """
    banner = bytes(banner)
    if len(banner) > MAX_BANNER_LENGTH:
        raise ValueError(
            f"banner is {len(banner)} bytes; at most {MAX_BANNER_LENGTH} fit in the boot sector"
        )
    code = _assemble(banner, pit_divisor(tone_hz))
    padding = bytes(_SECTOR_SIZE - len(_SIGNATURE) - len(code))
    sector = code + padding + _SIGNATURE
    assert len(sector) == _SECTOR_SIZE
    return sector
