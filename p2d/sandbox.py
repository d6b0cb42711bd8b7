"""Confine the current process before it runs model-generated code: Linux Landlock, no privileges needed.

After `confine(workdir)` the process (and anything it starts) can read the filesystem but write
only inside `workdir`, cannot execute any file (so `os.system`, `subprocess` and
`ctypes.CDLL(None).system` fail), cannot bind or connect TCP sockets (Landlock ABI >= 4), and, where
the kernel lets an unprivileged process make a network namespace, has no network at all. It cannot
regain privileges (no_new_privs). Landlock needs Linux >= 5.13 with the LSM enabled; `available()`
says whether it is, and callers refuse to run generated code without it unless told otherwise.
"""

from __future__ import annotations

import ctypes
import os

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446  # same on x86_64 and aarch64
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000

_FS_EXECUTE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
_FS_BITS_BY_ABI = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}  # ABI 2 adds REFER, 3 TRUNCATE, 5 IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    try:
        version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (AttributeError, OSError):
        return 0
    return max(int(version), 0)


def available() -> bool:
    return abi() >= 1


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: {what}: {os.strerror(err)}")
    return result


def confine(workdir: str | os.PathLike) -> dict:
    """Apply the sandbox to this process for good; returns what it enforces."""
    version = abi()
    if version < 1:
        raise OSError("sandbox: Landlock is not available on this kernel")
    fs_all = (1 << _FS_BITS_BY_ABI.get(version, 16)) - 1
    attr = _RulesetAttr(fs_all, (_NET_BIND_TCP | _NET_CONNECT_TCP) if version >= 4 else 0,
                        (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if version >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if version >= 6 else (16 if version >= 4 else 8)
    ruleset = _check(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "create ruleset")
    try:
        for path, access in (("/", _FS_READ_FILE | _FS_READ_DIR), (os.fspath(workdir), fs_all & ~_FS_EXECUTE)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(access, fd)
                _check(_libc.syscall(_SYS_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)),
                       f"allow {path}")
            finally:
                os.close(fd)
        own_network = _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0  # best effort: no network at all
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(_libc.syscall(_SYS_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)), "restrict self")
    finally:
        os.close(ruleset)
    return {"landlock_abi": version, "writable": os.fspath(workdir), "execute": False,
            "tcp": "denied" if version >= 4 or own_network else "allowed", "network_namespace": own_network}
