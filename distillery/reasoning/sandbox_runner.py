"""Runs one call of untrusted code; started by reasoning/sandbox.py as `python -I sandbox_runner.py`.

This script itself is trusted. It reads its whole job from stdin (JSON: code, funcname, args, limits, uid,
nonce), then, before any untrusted line runs:
1. new namespaces: mount, network, IPC and PID (and, when not root, a user namespace that maps only our own uid);
   in its own IPC namespace the code's System V segments, semaphores and message queues and its POSIX message
   queues are gone with the run (in the host's they outlived it, holding memory, and 0666 ones of host services
   could be opened);
   the code runs in a child that is PID 1 of its own namespace, in a session of its own: it can neither see nor
   signal any process outside it (kill(-1) and kill(0) included), and everything it starts dies with it. This process stays outside, waits, and
   as a subreaper keeps every process of the run below it (the parent kills them all there);
2. a new root (`new_root`): a small read-only tmpfs holding only what Python needs to run (/usr, the
   interpreter's own sys.path directories, /dev/null and the random devices), all read-only, and one writable
   tmpfs of `file_size_mb` as the working directory (/sandbox; /tmp points there). The old tree is detached: /home,
   /root, /opt, /srv, /run, the project and every cache (HF tokens, `.env` files, host Unix sockets) do not exist
   for the code;
3. resource limits: CPU seconds, address space, file size, open files, no core dumps, process count; an empty
   capability bounding set and, in a user namespace (where the code would otherwise hold every capability inside
   it), no capabilities: both per thread, so before step 4, whose imports may start native threads;
4. imports the modules the code names while it may still read every file of the runtime;
5. its own empty session keyring (root's keys are not inherited), then, when started as root, a throw-away
   uid/gid with no groups (on every thread) and no capabilities;
6. a seccomp filter on every thread (`SYSCALLS`, `DENIED`, `FIRST_UNVETTED`): no sockets of any family, no io_uring, no new
   namespaces, no
   mounts, no keyrings, no kernel log, no userfaultfd, perf_event_open, bpf, ptrace or module loading, and no
   memory that no process maps (memfd_create, System V shared memory, semaphores and message queues: the watchdog, which
   sums what processes map, never saw it);
7. an audit hook refusing Python-level writes outside the working directory (a second layer, for systems where
   the namespaces are not available);
   Without the namespaces and the new root, the job's `require_new_root` (isolation: required, the default)
   refuses the run before any of the code is read;
8. runs the code, calls `funcname(**args)` (or `funcname(args)` when args is not an object) and prints the
   JSON of the result on one line prefixed by the nonce.
The first line on stderr says which layers hold. The parent bounds the memory and processes of everything the
run starts with a cgroup (reasoning/cgroups.py) and reads the result as untrusted text.
"""

import ast
import ctypes
import errno
import importlib
import json
import os
import platform
import resource
import signal
import sys
import sysconfig

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (0x00020000, 0x08000000, 0x10000000, 0x20000000,
                                                                      0x40000000)
# Every CLONE_NEW* flag: clone(2) with any of them is refused (NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET).
NAMESPACE_FLAGS = 0x7E020000
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
WORK = "/sandbox"  # the working directory inside the new root (another name if a runtime path uses it)
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
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
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


# ---- 1-2. namespaces and the new root ---------------------------------------------------------------------


def isolate(host_dir: str, disk_mb: int, uid, user_namespace: bool) -> tuple[str, str, str]:
    """New namespaces and, in them, the new root: (what cuts the network, what hides and contains files, whether
    the code's processes get a namespace of their own). The IPC namespace comes with the network's."""
    c = libc()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID | (CLONE_NEWUSER if user_namespace else 0)
    ids = os.getuid(), os.getgid()  # read before the new user namespace, where they are unmapped
    try:
        checked(c.unshare(flags), "unshare")
    except (OSError, AttributeError):  # no namespaces here (a container without CAP_SYS_ADMIN, userns disabled)
        try:
            alone = CLONE_NEWNET | CLONE_NEWIPC | (CLONE_NEWUSER if user_namespace else 0)
            network = "namespace" if c.unshare(alone) == 0 else "audit-hook"
        except AttributeError:  # not Linux
            network = "audit-hook"
        return network, "audit-hook", "shared"
    if user_namespace:
        map_own_ids(*ids)
    # the new root holds the runtime at its real paths: a venv reached through a symlink is found there
    sys.path[:] = [os.path.realpath(entry) if entry else entry for entry in sys.path]
    try:
        new_root(host_dir, disk_mb, uid)
    except OSError:
        return "namespace", "audit-hook", "namespace"
    return "namespace", "new-root", "namespace"


def map_own_ids(uid: int, gid: int) -> None:
    """In a new user namespace: our own uid and gid map to themselves (nothing else exists in it)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


# Linux's mount API (5.2+ for open_tree/move_mount, 5.12+ for mount_setattr); the same numbers on x86-64 and arm64.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 16384, 1 << 18
MNT_DETACH, AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = 2, -100, 0x1000, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC, MOVE_MOUNT_F_EMPTY_PATH = 1, 0o2000000, 4


def runtime_paths() -> list[str]:
    """What Python needs to run and import: /usr, and this interpreter's sys.path entries that lie in its library
    directories (the standard library's and site-packages, the venv's and the base interpreter's). Never a
    prefix itself: a venv made in a project's own folder (`python -m venv .`) has the project as its prefix, and
    an editable install's .pth file puts the project on sys.path, `.env` files and all."""
    libraries = set()
    for prefixes in (None, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        scheme = sysconfig.get_paths(vars=prefixes)
        libraries.update(os.path.realpath(scheme[key]) for key in ("stdlib", "platstdlib", "purelib", "platlib"))
    homes = {os.path.dirname(library) for library in libraries}  # lib/, where a zipped standard library lies
    paths = {"/usr"}
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else ""
        in_library = any(real == lib or real.startswith(lib + os.sep) for lib in libraries)
        zipped_stdlib = real.endswith(".zip") and os.path.dirname(real) in homes
        if real and os.path.exists(real) and (in_library or zipped_stdlib):
            paths.add(real)
    kept: list[str] = []
    for path in sorted(paths):  # a parent sorts before its children: bind each tree once
        if not any(path == k or path.startswith(k + os.sep) for k in kept):
            kept.append(path)
    return kept


def bind(source: str, target: str, attributes: int) -> None:
    """Mount a copy of `source` (and every mount below it) at `target`, with `attributes` (read-only, ...)."""
    c = libc()
    tree = checked(c.syscall(SYS_OPEN_TREE, AT_FDCWD, source.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
                   f"cloning {source}")
    try:
        if attributes:
            attr = MountAttr(attributes, 0, 0, 0)
            checked(c.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr),
                              ctypes.sizeof(attr)), f"restricting {source}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(source):
            os.makedirs(target, exist_ok=True)
        else:
            open(target, "a").close()
        checked(c.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                f"mounting {source}")
    finally:
        os.close(tree)


def new_root(host_dir: str, disk_mb: int, uid) -> None:
    """Build the new root on a tmpfs mounted over `host_dir` (the empty directory the parent made), pivot into it
    and detach the old tree. Nothing of it is visible outside this mount namespace."""
    c = libc()
    checked(c.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    checked(c.mount(b"tmpfs", host_dir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=4m,nr_inodes=4096,mode=0755"),
            "the new root")
    new = host_dir.rstrip("/")
    for path in runtime_paths():
        bind(path, new + path, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(link):  # merged /usr: these point into it
            os.symlink(os.readlink(link), new + link)
        elif os.path.isdir(link):
            bind(link, new + link, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    for device in DEVICES:
        if os.path.exists(device):
            bind(device, new + device, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)  # still read and written: not chmod
    work = next(f"{WORK}{n or ''}" for n in range(100) if not os.path.lexists(f"{new}{WORK}{n or ''}"))
    os.makedirs(new + work)
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    checked(c.mount(b"tmpfs", (new + work).encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                    f"size={disk_mb}m,nr_inodes=8192,mode=0700{owner}".encode()), "the working directory")
    if not os.path.lexists(new + "/tmp"):
        os.symlink(work.lstrip("/"), new + "/tmp")
    os.makedirs(new + "/.old")
    checked(c.mount(None, new.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None), "a read-only root")
    checked(c.syscall(SYS_PIVOT_ROOT.get(platform.machine(), -1), new.encode(), (new + "/.old").encode()), "pivot_root")
    # Past the pivot there is no way back to a consistent state: a failure ends the run (never runs the code).
    os.chdir("/")
    if c.umount2(b"/.old", MNT_DETACH) != 0:
        raise SystemExit(f"sandbox: cannot detach the old root: {os.strerror(ctypes.get_errno())}")
    os.chdir(work)


# ---- 3-5. limits, imports, keyring, uid ---------------------------------------------------------------------


def set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_size_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"],) * 2)


def preimport(code: str) -> None:
    """Import the modules the code names while every file of the runtime is still readable (the throw-away uid
    may be unable to read some). Importing an installed module runs no code of the job."""
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
        if name.split(".")[-1] == "__main__":  # a program (`import venv.__main__` runs venv): the code's own import
            continue
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - not a module (a class imported from one), not installed, a module that
            pass  # exits when imported: the job's own import says so, inside the walls


SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
KEYCTL_JOIN_SESSION_KEYRING = 1


def own_session_keyring() -> str:
    """Leave the inherited session keyring (root's keys) for a new, empty, anonymous one."""
    number = SYS_KEYCTL.get(platform.machine())
    if number is None or libc().syscall(number, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        return "inherited"
    return "own"


def drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
CAPABILITY_VERSION_3 = 0x20080522


def empty_bounding_set() -> None:
    """No capability can come back, not even through executing a program as (namespace) root. Needs CAP_SETPCAP,
    which a process without capabilities does not have and does not need this for; so failures are ignored."""
    c = libc()
    for capability in range(64):
        if c.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) < 0 and ctypes.get_errno() == errno.EINVAL:
            return  # past the kernel's last capability


def drop_capabilities() -> None:
    """Clear every capability this process holds. In a user namespace the code would otherwise keep all of them
    inside it (CAP_SYS_ADMIN among them): enough to clone the read-only runtime mounts writable with a mount call
    newer than the seccomp list (open_tree_attr, Linux 6.15) and write into the host's files."""
    c = libc()
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    checked(c.capset(header, (ctypes.c_uint32 * 6)()), "capset")  # effective, permitted, inheritable: all empty
    c.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


# ---- 6. seccomp ---------------------------------------------------------------------------------------------

# name: (x86_64, aarch64) numbers, from the kernel's unistd headers.
SYSCALLS = {
    "socket": (41, 198), "socketpair": (53, 199), "clone": (56, 220), "clone3": (435, 435), "ptrace": (101, 117),
    "pivot_root": (155, 41), "chroot": (161, 51), "mount": (165, 40), "umount2": (166, 39),
    "init_module": (175, 105), "delete_module": (176, 106), "finit_module": (313, 273), "kexec_load": (246, 104),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219), "unshare": (272, 97),
    "setns": (308, 268), "perf_event_open": (298, 241), "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "bpf": (321, 280), "userfaultfd": (323, 282), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "msgget": (68, 186),
    "semget": (64, 190), "syslog": (103, 116),
}
# What each refused call returns. Sockets of every family: the network namespace is empty, but AF_UNIX reaches
# filesystem paths and AF_VSOCK the hypervisor. clone3 gets ENOSYS so that the C library falls back to clone,
# whose flags a filter can read (clone3's are behind a pointer); clone itself is refused only with namespace flags.
# memfd_create, shmget, msgget and semget hold memory in the kernel that no process maps (a memfd written to and
# kept open, a segment touched and detached, 512 MB of queued messages, 2 MB a semaphore set of 32,000): the
# watchdog, which sums what the run's processes map, would not see it.
DENIED = {name: errno.EPERM for name in SYSCALLS if name != "clone"}
# syslog: the host's kernel log where kernel.dmesg_restrict is 0; ENOSYS, which the kernel never answers for it,
# tells the filter's refusal from the kernel's own EPERM where the sysctl already restricts it.
DENIED.update(socket=errno.EACCES, socketpair=errno.EACCES, clone3=errno.ENOSYS, syslog=errno.ENOSYS)
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Calls from statmount/listmount (Linux 6.8) on, the same numbers on both architectures, get ENOSYS: what a kernel
# without them answers, so libraries fall back. New mount calls keep coming (open_tree_attr, 6.15, clones a mount
# with its read-only flag cleared), and a list of refusals only knows the calls that existed when it was written.
FIRST_UNVETTED = 457


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def seccomp_program(machine: str) -> list[tuple[int, int, int, int]]:
    """The BPF program: kill on a foreign architecture or the x32 ABI, ENOSYS from FIRST_UNVETTED on, an errno for
    each DENIED call, EPERM for clone with a namespace flag, allow the rest."""
    column = 0 if machine == "x86_64" else 1
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, JMP|JSET|K, RET|K
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    program = [(load, 0, 0, 4), (jeq, 1, 0, AUDIT_ARCH[machine]), (ret, 0, 0, kill),  # seccomp_data.arch
               (load, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, kill),  # seccomp_data.nr; x32 calls
               (jge, 0, 1, FIRST_UNVETTED), (ret, 0, 0, 0x00050000 | errno.ENOSYS)]
    for name, error in DENIED.items():
        program += [(jeq, 0, 1, SYSCALLS[name][column]), (ret, 0, 0, 0x00050000 | error)]  # SECCOMP_RET_ERRNO
    program += [(jeq, 0, 3, SYSCALLS["clone"][column]), (load, 0, 0, 16),  # clone's flags: args[0], low half
                (jset, 0, 1, NAMESPACE_FLAGS), (ret, 0, 0, 0x00050000 | errno.EPERM), (ret, 0, 0, allow)]
    return program


SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC = 1, 1


def install_seccomp() -> str:
    """Load the filter for every thread of this process (TSYNC: an installed module's import may have started
    native threads, which a filter of the calling thread alone would leave unfiltered) and everything it starts;
    returns what refuses the calls."""
    machine = platform.machine()
    if machine not in AUDIT_ARCH:
        return "audit-hook"
    program = seccomp_program(machine)
    filters = (SockFilter * len(program))(*(SockFilter(*step) for step in program))
    c = libc()
    try:
        checked(c.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS: needed without root; TSYNC copies it
        # seccomp(2) returns a thread's id (> 0) when that thread cannot take the filter
        if c.syscall(SYS_SECCOMP[machine], SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                     ctypes.byref(SockFprog(len(program), filters))) != 0:
            raise OSError(ctypes.get_errno(), "seccomp")
    except OSError:
        return "audit-hook"
    return "seccomp"


# ---- 7. the audit hook --------------------------------------------------------------------------------------


def inside(path, root: str) -> bool:
    if isinstance(path, int):  # an already open descriptor: opening it was checked
        return True
    full = os.path.realpath(os.path.join(root, os.fsdecode(path)))
    return full == root or full.startswith(root + os.sep)


WRITABLE_DEVICES = ("/dev/null", b"/dev/null")  # os.devnull, subprocess.DEVNULL: the new root's own node


def install_guard(root: str) -> None:
    """Refuse sockets, writes outside `root`, directories outside it and dir_fd-relative paths, for every later
    Python-level call (a second layer: the kernel's are the namespaces, the new root, the uid and seccomp)."""

    def guard(event: str, args: tuple) -> None:
        if event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is not allowed ({event})")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if (writing or is_directory(path)) and not inside(path, root) and path not in WRITABLE_DEVICES:
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


PR_SET_CHILD_SUBREAPER = 36


def run_in_a_child(namespace: bool, pipeline: int | None) -> None:
    """Fork: the child goes on to run the code (as PID 1 of the new PID namespace, where there is one); this
    process only waits and exits as it did. It is a subreaper: an orphan of the code becomes its child, so every
    process of the run stays below it, where the parent finds and kills them, setsid() or not. When the pipeline
    (`pipeline`, its pid) ends before the code does, this process kills it: a kill -9 of distill left code that
    sleeps running, unbounded, as no parent was left to end it at its time limit."""
    libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    pid = os.fork()
    if pid == 0:
        # a session of its own: kill(0, ...) reached this process through the process group they shared (in a user
        # namespace, with the same uid), so the code could stop or kill its keeper and outlive the run
        os.setsid()
        return
    if pipeline is not None:
        wait_or_end_with(pipeline, pid)
    _, status = os.waitpid(pid, 0)
    if not namespace:  # the first process's exit ended a namespace; without one, end what it left ourselves
        end_the_rest()
    if os.WIFSIGNALED(status):
        if os.WTERMSIG(status) not in (signal.SIGKILL, signal.SIGSTOP):  # no handler can be set for these two
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


def wait_or_end_with(pipeline: int, code: int) -> None:
    """Return when process `code` ends, killing it first if process `pipeline` ends before it. Pidfds, not a
    thread: after unshare(CLONE_NEWPID) this process can start none."""
    import select

    try:
        watched = [os.pidfd_open(code)]
    except (AttributeError, OSError):
        return  # no pidfd here (a kernel before 5.3): the CPU time limit still ends the code
    try:
        watched.append(os.pidfd_open(pipeline))
    except ProcessLookupError:
        os.kill(code, signal.SIGKILL)  # gone already
        return
    except OSError:
        return
    ready, _, _ = select.select(watched, [], [])
    if watched[0] not in ready:
        os.kill(code, signal.SIGKILL)


def end_the_rest() -> None:
    """Kill and reap every process the code left (all are our children by now, or become so as their parents
    die), before our exit would hand them to the host's init."""
    while True:
        for stat in os.listdir("/proc"):
            try:
                with open(f"/proc/{stat}/stat") as handle:
                    text = handle.read()
                if int(text[text.rindex(")") + 2:].split()[1]) == os.getpid():
                    os.kill(int(stat), signal.SIGKILL)
            except (OSError, ValueError):
                continue
        try:
            os.wait()
        except ChildProcessError:
            return


def main() -> None:
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    sys.dont_write_bytecode = True
    limits, uid = job["limits"], job.get("uid")
    user_namespace = job.get("user_namespace", os.geteuid() != 0)
    network, files, processes = isolate(os.path.realpath(os.getcwd()), limits["file_size_mb"], uid, user_namespace)
    if job.get("require_new_root", True) and (network, files) != ("namespace", "new-root"):
        print(f"{job['nonce']} isolation {network} {files} - - {processes}\n{job['nonce']} refused", file=sys.stderr,
              flush=True)
        sys.exit(1)  # before a line of the code runs: the walls it was promised are not there
    run_in_a_child(processes == "namespace", job.get("pipeline"))
    root = os.path.realpath(os.getcwd())
    os.environ["HOME"] = os.environ["TMPDIR"] = root
    set_limits(limits)
    # Capabilities and the bounding set are per thread: dropped before the imports, whose native threads (hf_xet,
    # jemalloc) inherit them. As root the uid changes after them, on every thread (the C library's setuid does).
    empty_bounding_set()
    if uid is None:
        drop_capabilities()
    preimport(job["code"])
    keyring = own_session_keyring()
    if uid is not None:
        drop_privileges(uid)
        drop_capabilities()
    syscalls = install_seccomp()
    install_guard(root)
    print(f"{job['nonce']} isolation {network} {files} {syscalls} {keyring} {processes}", file=sys.stderr, flush=True)
    namespace = {"__name__": "__sandboxed__"}
    exec(compile(job["code"], "<refcode>", "exec"), namespace)
    function = namespace[job["funcname"]]
    args = job["args"]
    result = function(**args) if isinstance(args, dict) else function(args)
    sys.stdout.flush()
    print(f"\n{job['nonce']} {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
