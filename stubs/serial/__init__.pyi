# The part of pyserial 3.5 that drivers/serial_link.py uses (pyserial ships no type information; adding the
# types-pyserial package would be a new dependency). Only drivers/serial_link.py imports `serial`.

EIGHTBITS: int
PARITY_NONE: str
STOPBITS_ONE: float

class SerialException(OSError): ...  # noqa: N818 - pyserial's own names
class SerialTimeoutException(SerialException): ...
class PortNotOpenError(SerialException): ...

class Serial:
    timeout: float | None
    def __init__(
        self,
        port: str | None = ...,
        baudrate: int = ...,
        bytesize: int = ...,
        parity: str = ...,
        stopbits: float = ...,
        timeout: float | None = ...,
        xonxoff: bool = ...,
        rtscts: bool = ...,
        write_timeout: float | None = ...,
        dsrdtr: bool = ...,
        inter_byte_timeout: float | None = ...,
        exclusive: bool | None = ...,
    ) -> None: ...
    @property
    def in_waiting(self) -> int: ...
    @property
    def is_open(self) -> bool: ...
    def read(self, size: int = ...) -> bytes: ...
    def write(self, data: bytes) -> int | None: ...
    def flush(self) -> None: ...
    def reset_input_buffer(self) -> None: ...
    def close(self) -> None: ...
