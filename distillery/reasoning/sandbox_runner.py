"""Runs one call of untrusted code; started by reasoning/sandbox.py as `python -I sandbox_runner.py`.

This script itself is trusted. It reads its whole job from stdin (JSON: code, funcname, args, limits, uid,
nonce), then, before any untrusted line runs:
1. cuts the network: a new network namespace (root: CLONE_NEWNET; others: CLONE_NEWUSER|CLONE_NEWNET when the
   kernel allows unprivileged user namespaces) and, in every case, an audit hook that refuses sockets;
2. as root, also a private mount namespace (`private_mounts`): the whole file tree read-only, fresh small tmpfs
   on the world-writable /tmp, /var/tmp and /dev/shm (gone with the run), only the working directory writable
   at its usual path. Nothing can be created outside it, whatever the path, dir_fd or symlink;
3. sets resource limits: CPU seconds, address space, file size, open files, no core dumps, and process count;
4. when started as root, imports the modules the code names (the throw-away uid may not be able to read the
   interpreter's files), then drops to a throw-away uid/gid with no groups (RLIMIT_NPROC does not bind root,
   and that uid owns nothing but the empty working directory);
5. a seccomp filter refuses socket(AF_UNIX): a network namespace does not cover sockets on filesystem paths;
6. refuses, through the audit hook, writes, renames and deletions outside the working directory, opening a
   directory outside it, and path calls relative to a directory descriptor;
7. runs the code, calls `funcname(**args)` (or `funcname(args)` when args is not an object) and prints the
   JSON of the result on one line prefixed by the nonce.
Python-level hooks can be bypassed (ctypes, and os.mkfifo raises no audit event); the namespaces, seccomp,
limits and uid are the kernel-enforced layers. The first line on stderr says which layers hold.
"""

import ast
import ctypes
import importlib
import json
import os
import platform
import resource
import socket
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")  # the world-writable directories; a fresh tmpfs each
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Standard modules that other modules import lazily, on first use (strptime, socket host names, codecs).
LAZY_STDLIB = ("_strptime", "encodings.idna", "encodings.latin_1", "encodings.ascii", "encodings.utf_16",
               "encodings.utf_32", "encodings.unicode_escape", "encodings.raw_unicode_escape", "encodings.cp1252")
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
               "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
# Events whose last argument is a dir_fd (-1 or None when the call has none).
DIR_FD_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.chmod", "os.chown", "os.utime"}


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def checked(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def isolate(root: str, tmp_mb: int) -> tuple[str, str]:
    """New namespaces where the kernel lets us: (what cuts the network, what contains file writes)."""
    if os.geteuid() == 0:
        try:
            checked(libc().unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
        except (OSError, AttributeError):  # no mount namespaces here (a container without CAP_SYS_ADMIN)
            return isolate_network(CLONE_NEWNET), "audit-hook"
        try:
            private_mounts(root, tmp_mb)
            return "namespace", "private-mounts"
        except OSError:
            return "namespace", "audit-hook"
    return isolate_network(CLONE_NEWUSER | CLONE_NEWNET), "audit-hook"


def isolate_network(flags: int) -> str:
    try:
        unshared = libc().unshare(flags) == 0
    except (OSError, AttributeError):  # no unshare(2): not Linux
        unshared = False
    return "namespace" if unshared else "audit-hook"


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


# Linux's mount API (5.2+ for open_tree/move_mount, 5.12+ for mount_setattr); the same numbers on x86-64 and arm64.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 1, 0o2000000, 4


def private_mounts(root: str, tmp_mb: int) -> None:
    """In our own mount namespace: every mount read-only, fresh tmpfs on PRIVATE_TMP, `root` writable at its path.

    The working directory is cloned as a detached mount first, so that it keeps its path (usually under /tmp)
    and stays writable after the tree above it turned read-only and /tmp was replaced."""
    c = libc()
    checked(c.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    work = checked(c.syscall(SYS_OPEN_TREE, AT_FDCWD, root.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
                   "cloning the working directory")
    readonly = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    checked(c.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(readonly),
                      ctypes.sizeof(readonly)), "making the tree read-only")
    options = f"size={tmp_mb}m,nr_inodes=4096,mode=1777".encode()
    for directory in PRIVATE_TMP:
        if os.path.isdir(directory):
            checked(c.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options),
                    f"a private {directory}")
    os.makedirs(root, exist_ok=True)
    checked(c.syscall(SYS_MOVE_MOUNT, work, b"", AT_FDCWD, root.encode(), MOVE_MOUNT_F_EMPTY_PATH),
            "mounting the working directory")
    os.close(work)
    os.chdir(root)


# seccomp: refuse socket(AF_UNIX, ...) with EACCES, kill on a foreign architecture or the x32 ABI.
SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # AUDIT_ARCH_*, __NR_socket


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def deny_unix_sockets() -> str:
    """A seccomp filter that makes socket(AF_UNIX) fail; returns what refuses them."""
    known = SECCOMP_ARCH.get(platform.machine())
    if known is None:
        return "audit-hook"
    arch, nr_socket = known
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, kill, deny = 0x7FFF0000, 0x80000000, 0x00050000 | 13  # SECCOMP_RET_ALLOW, KILL_PROCESS, ERRNO(EACCES)
    program = [
        (load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # seccomp_data.arch
        (load, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, kill),  # seccomp_data.nr; x32 syscalls
        (jeq, 0, 3, nr_socket), (load, 0, 0, 16), (jeq, 0, 1, socket.AF_UNIX), (ret, 0, 0, deny),  # args[0]
        (ret, 0, 0, allow),
    ]
    filters = (SockFilter * len(program))(*(SockFilter(*step) for step in program))
    c = libc()
    try:
        checked(c.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS: needed without root
        checked(c.prctl(22, 2, ctypes.byref(SockFprog(len(program), filters)), 0, 0), "seccomp")  # SECCOMP_MODE_FILTER
    except OSError:
        return "audit-hook"
    return "seccomp"


def set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"],) * 2)


def preimport(code: str) -> None:
    """Import the modules the code names while we may still read every file.

    The throw-away uid may be unable to read the interpreter's own files (e.g. a pyenv under /root, mode 0700);
    modules already in sys.modules need no file access. Importing an installed module runs no code of the job.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return  # reported when the code is compiled
    names = set(LAZY_STDLIB)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for name in sorted(names):
        try:
            importlib.import_module(name)
        except Exception:  # not a module (a class imported from one) or not installed: the job's own import says so
            pass


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def inside(path, root: str) -> bool:
    if isinstance(path, int):  # an already open descriptor: opening it was checked
        return True
    full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
    return full == root or full.startswith(root + os.sep)


def install_guard(root: str) -> None:
    """Refuse sockets, writes outside `root`, directories outside it and dir_fd-relative paths, for every later
    Python-level call (a second layer: the kernel's are in isolate, drop_privileges and deny_unix_sockets)."""

    def guard(event: str, args: tuple) -> None:
        if event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is not allowed ({event})")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if (writing or is_directory(path)) and not inside(path, root):
                raise PermissionError(f"sandbox: {'writing' if writing else 'opening a directory'} outside the "
                                      f"working directory is not allowed ({path})")
        elif event in PATH_EVENTS:
            if isinstance(args[-1], int) and args[-1] not in (-1, None) and event in DIR_FD_EVENTS:
                raise PermissionError(f"sandbox: {event} relative to a directory descriptor is not allowed")
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, root):
                    raise PermissionError(f"sandbox: {event} outside the working directory is not allowed ({path})")

    sys.addaudithook(guard)


def is_directory(path) -> bool:
    return not isinstance(path, int) and os.path.isdir(path)


def main() -> None:
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    sys.dont_write_bytecode = True
    root = os.path.realpath(os.getcwd())
    network, files = isolate(root, job["limits"]["file_size_mb"])
    set_limits(job["limits"])
    if job.get("uid") is not None:
        preimport(job["code"])
        drop_privileges(job["uid"])
    unix_sockets = deny_unix_sockets()
    install_guard(root)
    print(f"{job['nonce']} isolation {network} {files} {unix_sockets}", file=sys.stderr, flush=True)
    namespace = {"__name__": "__sandboxed__"}
    exec(compile(job["code"], "<refcode>", "exec"), namespace)
    function = namespace[job["funcname"]]
    args = job["args"]
    result = function(**args) if isinstance(args, dict) else function(args)
    sys.stdout.flush()
    print(f"\n{job['nonce']} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
