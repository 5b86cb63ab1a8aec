"""A streaming tar reader for archives nobody vouches for: image layers and offline imports.

Why not CPython's ``tarfile``: it parses PAX bodies with a regular expression that backtracks on
crafted input while holding the GIL (CVE-2024-6232 class; an 80 000-digit record length stalled
every RPC for 12 s), copies every global PAX record into every later member (60 000 global keys
took the daemon to 3.7 GB), turns a bad header partway through into a silent end of archive, and
hands through negative sizes, non-finite times and NULs in names.  This reader:

* parses ustar, GNU (long name, long link, base-256 numbers) and PAX (extended and global)
  headers in time linear in their size, checking each size before a byte of the body is read;
* verifies every header's checksum (unsigned or signed sum, as Go's ``archive/tar``);
* refuses what is corrupt with :class:`TarCorrupt`, naming the byte offset of the header:
  non-numeric or negative numbers, sizes over the limit, uid/gid outside 0..2^32-2, times that
  are not finite decimals within +-2^33 s, NUL in a PAX path or link, malformed PAX records, a
  stream ending inside a header or a member's data, a non-zero block after a zero block;
* refuses what is over a limit, and sparse members, with :class:`TarRefused`;
* checks global PAX headers and then ignores them, as containerd does;
* ends where Go's ``archive/tar`` (so containerd) ends: at two zero blocks, at one zero block
  followed by the end of the stream, or at the end of the stream on a header boundary.  What
  follows the end marker is not read here (callers hash it into the layer's diff_id).

It reads its source forward only (``read(n)``), never more than one header body at a time, and
keeps nothing of an entry once the next one is read: memory is bounded by the limits, whatever
the headers hold.  Only the standard library is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from moorage.core.errors import DataLoss, InvalidArgument

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_MAX_ID = (1 << 32) - 2          # uid/gid: (uid_t)-1 means "unchanged" to chown, so it is not an id
_MAX_TIME_S = 1 << 33            # +-272 years: always fits utime()'s int64 nanoseconds
_MAX_LEN_DIGITS = 7              # a PAX record length; bodies are at most 1 MiB by default
_XATTR_NAME_MAX = 255            # Linux XATTR_NAME_MAX
_XATTR_SIZE_MAX = 65536          # Linux XATTR_SIZE_MAX
_SHOWN = 120                     # characters of an untrusted name put in a message

REGULAR = b"0"
REGULAR_OLD = b"\0"
CONTIGUOUS = b"7"
HARDLINK = b"1"
SYMLINK = b"2"
CHAR = b"3"
BLOCKDEV = b"4"
DIRECTORY = b"5"
FIFO = b"6"
PAX_EXTENDED = b"x"
PAX_GLOBAL = b"g"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
GNU_SPARSE = b"S"
_HEADER_ONLY = {HARDLINK, SYMLINK, CHAR, BLOCKDEV, DIRECTORY, FIFO}
_KIND = {PAX_EXTENDED: "PAX extended", PAX_GLOBAL: "PAX global",
         GNU_LONGNAME: "GNU long name", GNU_LONGLINK: "GNU long link"}


class TarCorrupt(DataLoss):
    """The bytes are not a valid tar archive.  DATA_LOSS: retrying cannot help, the content
    (whose digest matched) is itself broken."""


class TarRefused(InvalidArgument):
    """A well-formed archive that goes over a limit or uses what is not supported (sparse)."""


@dataclass(frozen=True, slots=True)
class TarLimits:
    max_headers: int = 8_000_000      # header blocks of the archive, extended ones included
    max_size: int = 1 << 40           # one member's data
    max_ext_header: int = 1 << 20     # one extended header's body, and all of those before one member
    max_ext_chain: int = 8            # extended headers before one member (PAX + long name + long link)
    max_global_bytes: int = 1 << 20   # the bodies of all global PAX headers of the archive
    max_pax_records: int = 4096       # records of one PAX header
    max_path: int = 4096              # bytes of a name or link target (Linux PATH_MAX)
    max_xattrs: int = 128             # per member
    max_xattr_bytes: int = 1 << 18    # names and values of one member's xattrs


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member as the applier needs it; names are decoded UTF-8 with ``surrogateescape``, so
    they round-trip to their bytes through ``os`` calls."""

    offset: int                     # of its first header (extended ones included)
    name: str
    type: bytes                     # one byte; REGULAR for "0", "\\0" and "7"
    mode: int
    uid: int
    gid: int
    size: int                       # bytes of data that follow (0 for header-only types)
    mtime_ns: int
    atime_ns: int | None
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def isreg(self) -> bool:
        return self.type == REGULAR

    def isdir(self) -> bool:
        return self.type == DIRECTORY

    def issym(self) -> bool:
        return self.type == SYMLINK

    def islnk(self) -> bool:
        return self.type == HARDLINK

    def ischr(self) -> bool:
        return self.type == CHAR

    def isblk(self) -> bool:
        return self.type == BLOCKDEV

    def isfifo(self) -> bool:
        return self.type == FIFO


class _Source(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def shown(name: str | bytes) -> str:
    """An untrusted name fit for a message or log line: escaped and bounded."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    text = name.encode("unicode_escape", "backslashreplace").decode("ascii").replace('"', '\\"')
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}...({len(text) - _SHOWN} more)"


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated header field."""
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


@dataclass
class _Pending:
    """Extended headers seen since the last member."""

    offset: int = -1
    count: int = 0
    size: int = 0
    pax: dict[bytes, bytes] | None = None
    longname: bytes | None = None
    longlink: bytes | None = None


class TarReader:
    """Iterate the members of a tar stream; read a regular member's data with :meth:`read`
    before asking for the next one (what is left unread is skipped).

    ``label`` starts every error message (e.g. ``layer sha256:...``).
    """

    def __init__(self, src: _Source, *, label: str, limits: TarLimits = TarLimits()) -> None:
        self._src = src
        self._label = label
        self._limits = limits
        self._pos = 0               # bytes consumed from src
        self._remaining = 0         # data bytes of the current member not yet read
        self._padding = 0
        self._headers = 0
        self._global_bytes = 0
        self._header_at = 0         # offset of the header being parsed
        self.done = False

    # -- errors
    def _corrupt(self, reason: str, at: int | None = None) -> TarCorrupt:
        where = self._header_at if at is None else at
        return TarCorrupt(f"{self._label}: corrupt tar archive at byte offset {where}: {reason}")

    def _refused(self, reason: str, at: int | None = None) -> TarRefused:
        where = self._header_at if at is None else at
        return TarRefused(f"{self._label}: {reason} (tar header at byte offset {where})")

    @property
    def position(self) -> int:
        """Bytes read from the source: after :meth:`next`, where the member's data starts; after
        the end, where the end-of-archive marker ends."""
        return self._pos

    # -- reading
    def _read_exact(self, n: int, what: str) -> bytes:
        data = self._src.read(n)
        if len(data) < n:
            parts = [data]
            got = len(data)
            while got < n:
                chunk = self._src.read(n - got)
                if not chunk:
                    self._pos += got
                    raise self._corrupt(f"the stream ends inside {what} ({got} of {n} bytes)",
                                        at=self._pos)
                parts.append(chunk)
                got += len(chunk)
            data = b"".join(parts)
        self._pos += n
        return data

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member's data; b"" at its end."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        data = self._src.read(n)
        if not data:
            raise self._corrupt(f"the stream ends inside a member's data ({self._remaining} bytes "
                                "missing)", at=self._pos)
        self._pos += len(data)
        self._remaining -= len(data)
        return data

    def _skip_data(self) -> None:
        while self._remaining:
            self.read(1 << 20)
        if self._padding:
            self._read_exact(self._padding, "the padding after a member's data")
            self._padding = 0

    # -- fields
    def _number(self, field: bytes, what: str) -> int:
        if field and field[0] & 0x80:  # base-256 (GNU): big-endian two's complement
            value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
            if field[0] == 0xFF:
                value -= 1 << (8 * len(field) - 1)
            elif field[0] != 0x80:
                raise self._corrupt(f"the {what} field is not a number")
            return value
        text = field.strip(b" \0")
        if not text:
            return 0
        if text.strip(b"01234567"):
            raise self._corrupt(f"the {what} field is not an octal number")
        return int(text, 8)

    def _check_size(self, size: int) -> int:
        if size < 0:
            raise self._corrupt(f"the member size is negative ({size})")
        if size > self._limits.max_size:
            raise self._refused(f"a member claims {size} bytes, more than the limit of "
                                f"{self._limits.max_size} bytes")
        return size

    def _check_id(self, value: int, what: str) -> int:
        if not 0 <= value <= _MAX_ID:
            raise self._corrupt(f"the {what} {value} is outside 0..{_MAX_ID}")
        return value

    def _check_time(self, seconds: int, what: str) -> int:
        if not -_MAX_TIME_S <= seconds <= _MAX_TIME_S:
            raise self._corrupt(f"the {what} {seconds} is outside +-{_MAX_TIME_S} seconds")
        return seconds * 1_000_000_000

    def _pax_int(self, value: bytes, what: str) -> int:
        if value.startswith(b"-") and value[1:].isdigit():
            raise self._corrupt(f"the PAX {what} is negative")
        if not value.isdigit() or len(value) > 20:
            raise self._corrupt(f"the PAX {what} is not a decimal number of at most 20 digits")
        return int(value)

    def _pax_time(self, value: bytes, what: str) -> int:
        """Nanoseconds of a PAX time ("-?digits[.digits]"): finite and in range, parsed without
        floats (no inf, nan or exponent; no rounding)."""
        if len(value) > 40:
            raise self._corrupt(f"the PAX {what} is longer than 40 characters")
        neg = value.startswith(b"-")
        whole, dot, frac = (value[1:] if neg else value).partition(b".")
        if not whole.isdigit() or (frac and not frac.isdigit()):
            raise self._corrupt(f"the PAX {what} is not a decimal number of seconds")
        seconds = int(whole)
        ns = self._check_time(-seconds if neg else seconds, f"PAX {what}")
        sub = int(frac[:9].ljust(9, b"0")) if frac else 0
        return ns - sub if neg else ns + sub

    def _path(self, raw: bytes, what: str, pax: bool) -> str:
        if pax and b"\0" in raw:
            raise self._corrupt(f"the PAX {what} contains a NUL byte")
        if len(raw) > self._limits.max_path:
            raise self._refused(f"a {what} of {len(raw)} bytes is longer than the limit of "
                                f"{self._limits.max_path} bytes")
        return raw.decode("utf-8", "surrogateescape")

    # -- PAX
    def _pax_records(self, body: bytes) -> Iterator[tuple[bytes, bytes]]:
        """"<length> <keyword>=<value>\\n" records, strictly (as Go's archive/tar)."""
        pos, end, count = 0, len(body), 0
        while pos < end:
            space = body.find(b" ", pos, min(end, pos + _MAX_LEN_DIGITS + 1))
            digits = body[pos:space] if space > pos else b""
            if not digits.isdigit():
                raise self._corrupt(f"PAX record {count + 1} does not start with a length of at "
                                    f"most {_MAX_LEN_DIGITS} digits and a space")
            stop = pos + int(digits)
            if stop > end or stop < space + 3 or body[stop - 1] != 0x0A:
                raise self._corrupt(f"PAX record {count + 1} has a wrong length")
            eq = body.find(b"=", space + 1, stop)
            if eq <= space + 1 or b"\0" in body[space + 1:eq]:
                raise self._corrupt(f"PAX record {count + 1} has no keyword")
            count += 1
            if count > self._limits.max_pax_records:
                raise self._refused(f"a PAX header has more than {self._limits.max_pax_records} records")
            yield body[space + 1:eq], body[eq + 1:stop - 1]
            pos = stop

    def _ext_body(self, type_: bytes, size: int, pending: _Pending) -> bytes:
        kind = _KIND[type_]
        limit = self._limits.max_ext_header
        if size > limit:
            raise TarRefused(f"{self._label}: a {kind} tar header claims {size} bytes, more than the "
                             f"limit of {limit} bytes (at byte offset {self._header_at})")
        if type_ == PAX_GLOBAL:
            self._global_bytes += size
            if self._global_bytes > self._limits.max_global_bytes:
                raise self._refused(f"global PAX tar headers exceed the limit of "
                                    f"{self._limits.max_global_bytes} bytes")
        else:
            pending.count += 1
            pending.size += size
            if pending.count > self._limits.max_ext_chain or pending.size > limit:
                raise self._refused(f"a tar entry has more than {self._limits.max_ext_chain} extended "
                                    f"headers or more than {limit} bytes of them")
        body = self._read_exact(size, f"a {kind} header's body")
        pad = -size % BLOCK
        if pad:
            self._read_exact(pad, f"the padding of a {kind} header")
        return body

    # -- headers
    def _read_block(self) -> bytes | None:
        """512 bytes, or None when the stream ends exactly here."""
        data = self._src.read(BLOCK)
        if not data:
            return None
        while len(data) < BLOCK:
            chunk = self._src.read(BLOCK - len(data))
            if not chunk:
                raise self._corrupt(f"the stream ends inside a header ({len(data)} of {BLOCK} bytes)")
            data += chunk
        self._pos += BLOCK
        return data

    def _block(self) -> bytes | None:
        """The next header block, or None at the end of the archive."""
        self._header_at = self._pos
        block = self._read_block()
        if block is None or block != _ZERO_BLOCK:
            return block
        self._header_at = self._pos
        second = self._read_block()
        if second is not None and second != _ZERO_BLOCK:
            raise self._corrupt("a header follows a zero block (the end-of-archive marker is two "
                                "zero blocks)")
        return None

    def _checksum(self, block: bytes) -> None:
        stored = block[148:156]
        try:
            want = self._number(stored, "checksum")
        except TarCorrupt:
            raise self._corrupt("the header checksum field is not an octal number (not a tar "
                                "header)") from None
        unsigned = sum(block) - sum(stored) + 8 * 0x20
        if want == unsigned:
            return
        signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b & 0x80)
        if want != signed:
            raise self._corrupt("the header checksum does not match (not a tar header)")

    def __iter__(self) -> Iterator[TarEntry]:
        return self

    def __next__(self) -> TarEntry:
        entry = self.next()
        if entry is None:
            raise StopIteration
        return entry

    def next(self) -> TarEntry | None:
        """The next member, or None after the end of the archive."""
        if self.done:
            return None
        self._skip_data()
        pending = _Pending()
        while True:
            block = self._block()
            if block is None:
                if pending.count:
                    raise self._corrupt("the archive ends after an extended header, before its member")
                self.done = True
                return None
            self._headers += 1
            if self._headers > self._limits.max_headers:
                raise self._refused(f"the archive has more than {self._limits.max_headers} headers")
            self._checksum(block)
            if pending.offset < 0:
                pending.offset = self._header_at
            type_ = block[156:157]
            size = self._check_size(self._number(block[124:136], "size"))
            if type_ in _KIND:
                body = self._ext_body(type_, size, pending)
                if type_ == PAX_GLOBAL:
                    for _ in self._pax_records(body):
                        pass  # checked, then ignored (as containerd does)
                    if not pending.count:
                        pending.offset = -1
                elif type_ == PAX_EXTENDED:
                    records = pending.pax if pending.pax is not None else {}
                    for key, value in self._pax_records(body):
                        records[key] = value
                    pending.pax = records
                elif type_ == GNU_LONGNAME:
                    pending.longname = _cstr(body)
                else:
                    pending.longlink = _cstr(body)
                continue
            return self._entry(block, type_, size, pending)

    def _entry(self, block: bytes, type_: bytes, size: int, pending: _Pending) -> TarEntry:
        self._header_at = pending.offset  # errors name the entry's first header
        magic = block[257:265]
        name = _cstr(block[0:100])
        if magic[:6] == b"ustar\0":
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if type_ == GNU_SPARSE:
            raise self._refused(f"entry \"{shown(name)}\" is a sparse file; sparse tar members are not "
                                "supported (their holes would be written out in full)")
        if type_ in (REGULAR_OLD, CONTIGUOUS):
            type_ = DIRECTORY if type_ == REGULAR_OLD and name.endswith(b"/") else REGULAR
        mode = self._number(block[100:108], "mode")
        uid = self._number(block[108:116], "uid")
        gid = self._number(block[116:124], "gid")
        mtime_ns: int | None = None
        atime_ns: int | None = None
        link = _cstr(block[157:257])
        if pending.longname is not None:
            name = pending.longname
        if pending.longlink is not None:
            link = pending.longlink
        xattrs: dict[bytes, bytes] = {}
        if pending.pax:
            rec = pending.pax
            if any(k.startswith(b"GNU.sparse.") for k in rec):
                sparse = rec.get(b"GNU.sparse.name", rec.get(b"path", name))
                raise self._refused(f"entry \"{shown(sparse)}\" is a sparse file; sparse tar members are "
                                    "not supported (their holes would be written out in full)")
            if b"path" in rec:
                name = rec[b"path"]
                self._path(name, "path", pax=True)
            if b"linkpath" in rec:
                link = rec[b"linkpath"]
                self._path(link, "link target", pax=True)
            if b"size" in rec:
                size = self._check_size(self._pax_int(rec[b"size"], "size"))
            if b"uid" in rec:
                uid = self._pax_int(rec[b"uid"], "uid")
            if b"gid" in rec:
                gid = self._pax_int(rec[b"gid"], "gid")
            if b"mtime" in rec:
                mtime_ns = self._pax_time(rec[b"mtime"], "mtime")
            if b"atime" in rec:
                atime_ns = self._pax_time(rec[b"atime"], "atime")
            if b"ctime" in rec:
                self._pax_time(rec[b"ctime"], "ctime")
            xattrs = self._xattrs(rec)
        if mtime_ns is None:
            mtime_ns = self._check_time(self._number(block[136:148], "mtime"), "mtime")
        major = minor = 0
        if type_ in (CHAR, BLOCKDEV):
            major = self._number(block[329:337], "devmajor")
            minor = self._number(block[337:345], "devminor")
            if not (0 <= major < 1 << 12 and 0 <= minor < 1 << 20):
                raise self._corrupt(f"the device number {major}:{minor} is out of range")
        if not 0 <= mode <= 0o7777777:
            raise self._corrupt("the mode is out of range")
        entry = TarEntry(
            offset=pending.offset, name=self._path(name, "name", pax=False), type=type_,
            mode=mode, uid=self._check_id(uid, "uid"), gid=self._check_id(gid, "gid"),
            size=0 if type_ in _HEADER_ONLY else size, mtime_ns=mtime_ns, atime_ns=atime_ns,
            linkname=self._path(link, "link target", pax=False), devmajor=major, devminor=minor,
            xattrs=tuple((k.decode("utf-8", "surrogateescape"), v) for k, v in xattrs.items()))
        self._remaining = entry.size
        self._padding = -entry.size % BLOCK
        return entry

    def _xattrs(self, rec: dict[bytes, bytes]) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        total = 0
        for key, value in rec.items():
            if not key.startswith(b"SCHILY.xattr."):
                continue
            name = key[len(b"SCHILY.xattr."):]
            if not name or len(name) > _XATTR_NAME_MAX:
                raise self._corrupt(f"an xattr name is empty or longer than {_XATTR_NAME_MAX} bytes")
            if len(value) > _XATTR_SIZE_MAX:
                raise self._refused(f"an xattr value of {len(value)} bytes is more than the limit "
                                    f"of {_XATTR_SIZE_MAX} bytes")
            out[name] = value
            total += len(name) + len(value)
            if len(out) > self._limits.max_xattrs or total > self._limits.max_xattr_bytes:
                raise self._refused(f"an entry has more than {self._limits.max_xattrs} xattrs or more "
                                    f"than {self._limits.max_xattr_bytes} bytes of them")
        return out
