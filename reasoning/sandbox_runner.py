"""Runs one call of untrusted code; started by reasoning/sandbox.py as `python -I sandbox_runner.py`.

This script itself is trusted. It reads its whole job from stdin (JSON: code, funcname, args, limits, uid,
nonce), then, before any untrusted line runs:
1. cuts the network: a new network namespace (root: CLONE_NEWNET; others: CLONE_NEWUSER|CLONE_NEWNET when the
   kernel allows unprivileged user namespaces) and, in every case, an audit hook that refuses sockets;
2. sets resource limits: CPU seconds, address space, file size, open files, no core dumps, and process count;
3. when started as root, imports the modules the code names (the throw-away uid may not be able to read the
   interpreter's files), then drops to a throw-away uid/gid with no groups (RLIMIT_NPROC does not bind root,
   and that uid owns nothing but the empty working directory);
4. refuses, through the audit hook, writes, renames and deletions outside the working directory;
5. runs the code, calls `funcname(**args)` (or `funcname(args)` when args is not an object) and prints the
   JSON of the result on one line prefixed by the nonce.
Python-level hooks can be bypassed (ctypes); the namespace, limits and uid are the kernel-enforced layers.
"""

import ast
import ctypes
import importlib
import json
import os
import resource
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Standard modules that other modules import lazily, on first use (strptime, socket host names, codecs).
LAZY_STDLIB = ("_strptime", "encodings.idna", "encodings.latin_1", "encodings.ascii", "encodings.utf_16",
               "encodings.utf_32", "encodings.unicode_escape", "encodings.raw_unicode_escape", "encodings.cp1252")
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
               "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}


def isolate_network() -> str:
    """A fresh, empty network namespace when the kernel lets us; returns what holds."""
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    try:
        unshared = ctypes.CDLL(None, use_errno=True).unshare(flags) == 0
    except (OSError, AttributeError):  # no unshare(2): not Linux
        unshared = False
    return "namespace" if unshared else "audit-hook"


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
    """Refuse sockets, and writes outside `root`, for every later Python-level call."""

    def guard(event: str, args: tuple) -> None:
        if event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is not allowed ({event})")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writing and not inside(path, root):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed ({path})")
        elif event in PATH_EVENTS:
            for path in args[:2]:
                if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, root):
                    raise PermissionError(f"sandbox: {event} outside the working directory is not allowed ({path})")

    sys.addaudithook(guard)


def main() -> None:
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    sys.dont_write_bytecode = True
    root = os.path.realpath(os.getcwd())
    network = isolate_network()
    set_limits(job["limits"])
    if job.get("uid") is not None:
        preimport(job["code"])
        drop_privileges(job["uid"])
    install_guard(root)
    print(f"{job['nonce']} network {network}", file=sys.stderr, flush=True)
    namespace = {"__name__": "__sandboxed__"}
    exec(compile(job["code"], "<refcode>", "exec"), namespace)
    function = namespace[job["funcname"]]
    args = job["args"]
    result = function(**args) if isinstance(args, dict) else function(args)
    sys.stdout.flush()
    print(f"\n{job['nonce']} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
