"""export/llama_build.py without compiling: which CPU level is built, with which CMake arguments, and that a
cached wheel is reused only by the build it was made for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distillery.export import llama_build
from distillery.core.errors import UserError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path))
    monkeypatch.delenv("DISTILLERY_LLAMA_CPU", raising=False)
    monkeypatch.delenv("DISTILLERY_LLAMA_CMAKE_ARGS", raising=False)
    return tmp_path


def test_the_profile_help_names_the_level_chosen_by_default(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens otherwise
    with pytest.raises(SystemExit):
        llama_build.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "x86-64-v4-amx or x86-64-v4 where this CPU has every one of its flags and x86-64-v3 elsewhere" in help_text


def test_x86_64_machines_get_the_highest_level_their_cpu_has_unless_told_otherwise(home: Path, monkeypatch) -> None:
    monkeypatch.setattr(llama_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V3) | {"avx512f"})
    assert llama_build.chosen_profile() == "x86-64-v3"  # some AVX-512, not all of v4
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V4) | {"amx_int8", "amx_tile"})
    assert llama_build.chosen_profile() == "x86-64-v4"  # AMX without its bf16 part: v4 compiles none of it
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V4) | set(llama_build.AMX_FLAGS))
    assert llama_build.chosen_profile() == "x86-64-v4-amx"
    monkeypatch.setenv("DISTILLERY_LLAMA_CPU", "x86-64-v3")
    assert llama_build.chosen_profile() == "x86-64-v3"
    monkeypatch.setenv("DISTILLERY_LLAMA_CPU", "skylake")
    with pytest.raises(UserError, match="DISTILLERY_LLAMA_CPU=skylake: unknown; use one of x86-64-v3, x86-64-v4, "
                                        "x86-64-v4-amx, native"):
        llama_build.chosen_profile()


def test_setup_can_compile_llama_cpp_before_pip_has_installed_anything(home: Path) -> None:
    """`just setup` starts the compile in a fresh venv while pip installs the rest: the module must run on the
    standard library alone (-S: no site-packages). A yaml imported on the way made every fresh setup compile
    afterwards, minutes later."""
    root = Path(llama_build.__file__).parents[2]
    ran = subprocess.run([sys.executable, "-S", "-m", "distillery.export.llama_build", "--help"], cwd=root,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "x86-64-v3" in ran.stdout


def test_portable_levels_never_compile_native_avx512_or_amx_code(home: Path) -> None:
    v3, v4 = llama_build.cmake_args("x86-64-v3"), llama_build.cmake_args("x86-64-v4")
    for args in (v3, v4):
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args and "-DGGML_AMX_TILE=OFF" in args
        assert "-DLLAVA_BUILD=OFF" in args and f"-DCMAKE_PROJECT_INCLUDE={llama_build.HOOK}" in args
    assert "-DGGML_AVX512=OFF" in v3 and "-DGGML_AVX2=ON" in v3
    assert "-DGGML_AVX512=ON" in v4 and "-DGGML_AVX512_BF16=ON" in v4
    assert "set(LLAMA_BUILD_COMMON OFF" in llama_build.HOOK.read_text()
    amx = llama_build.cmake_args("x86-64-v4-amx")
    assert "-DGGML_NATIVE=OFF" in amx and "-DGGML_AVX512_VNNI=ON" in amx and "-DGGML_AMX_INT8=ON" in amx
    assert "-DGGML_AMX_TILE=ON" in amx


def test_the_amx_build_and_only_it_among_the_levels_is_keyed_by_the_patch(home: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    before = {level: llama_build.wheel_dir(level) for level in ("x86-64-v3", "x86-64-v4", "x86-64-v4-amx")}
    assert len(set(before.values())) == 3
    patch = tmp_path / "other.patch"
    patch.write_text(llama_build.PATCH.read_text() + "\n")
    monkeypatch.setattr(llama_build, "PATCH", patch)
    after = {level: llama_build.wheel_dir(level) for level in before}
    assert after["x86-64-v4-amx"] != before["x86-64-v4-amx"]
    assert after["x86-64-v3"] == before["x86-64-v3"] and after["x86-64-v4"] == before["x86-64-v4"]


def test_the_wheel_cache_key_separates_levels_extra_arguments_and_native_cpus(home: Path, monkeypatch) -> None:
    v3, v4 = llama_build.wheel_dir("x86-64-v3"), llama_build.wheel_dir("x86-64-v4")
    assert v3 != v4 and v3.parent == v4.parent == home / "wheels"
    assert v3.name.startswith("llama-cpp-python-0.3.36-x86-64-v3-")
    monkeypatch.setenv("DISTILLERY_LLAMA_CMAKE_ARGS", "-DGGML_CUDA=ON")
    assert llama_build.wheel_dir("x86-64-v3") != v3
    monkeypatch.delenv("DISTILLERY_LLAMA_CMAKE_ARGS")
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: {"avx2", "fma"})
    native_here = llama_build.wheel_dir("native")
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: {"avx2", "fma", "amx_int8"})
    assert llama_build.wheel_dir("native") != native_here  # a native wheel never moves to another CPU
    assert llama_build.wheel_dir("x86-64-v3") == v3  # a portable one does


def test_a_cached_wheel_is_reused_without_compiling(home: Path, monkeypatch) -> None:
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V4))
    target = llama_build.wheel_dir("x86-64-v3")
    target.mkdir(parents=True)
    wheel = target / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"PK")
    monkeypatch.setattr(llama_build, "fetch_sdist", lambda *a: pytest.fail("a cached build must not download"))
    assert llama_build.build("x86-64-v3") == wheel


def fake_sdist(home: Path, mmq: str) -> Path:
    """A tarball laid out as llama-cpp-python's sdist, holding only the file the patch touches."""
    import tarfile

    source = home / "fake" / "llama_cpp_python-0.3.36" / "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"
    source.parent.mkdir(parents=True)
    source.write_text(mmq)
    sdist = home / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(home / "fake" / "llama_cpp_python-0.3.36", arcname="llama_cpp_python-0.3.36")
    return sdist


def patch_sides() -> tuple[str, str]:
    """The text the patch expects (context and removed lines) and what it leaves (context and added lines)."""
    hunk = llama_build.PATCH.read_text().split("\n@@", 1)[1].split("\n", 1)[1].splitlines()
    return ("\n".join(line[1:] for line in hunk if line[:1] in (" ", "-")) + "\n",
            "\n".join(line[1:] for line in hunk if line[:1] in (" ", "+")) + "\n")


def test_the_sources_of_an_amx_build_get_the_tile_configuration_patch(home: Path) -> None:
    expected, patched = patch_sides()
    assert "alignas(64) tile_config_t tc = {};" in expected and "static const tile_config_t tc" in patched
    # The hunk starts at line 208 of the real file: the same lines before it
    root = llama_build.patched_sources(fake_sdist(home, "//\n" * 207 + expected), home / "src")
    assert (root / "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp").read_text() == "//\n" * 207 + patched


def test_sources_the_patch_does_not_fit_are_refused_with_the_way_out(home: Path) -> None:
    with pytest.raises(UserError, match="llama_amx_tile_config.patch does not apply .* DISTILLERY_LLAMA_CPU=x86-64-v4"):
        llama_build.patched_sources(fake_sdist(home, "int other_llama_cpp_version;\n"), home / "src")


@pytest.mark.parametrize("check_exit, installed", [(0, ["x86-64-v4-amx"]), (1, ["x86-64-v4-amx", "x86-64-v4"])])
def test_an_amx_build_that_fails_the_self_check_gives_way_to_v4(monkeypatch, check_exit: int,
                                                                 installed: list[str]) -> None:
    calls: list[str] = []
    monkeypatch.setattr(llama_build, "install", lambda profile: calls.append(profile) or Path(profile))
    monkeypatch.setattr(llama_build.subprocess, "run", lambda cmd, **kw: type("Done", (), {"returncode": check_exit}))
    assert llama_build.install_checked("x86-64-v4-amx", chosen=True) == Path(installed[-1])
    assert calls == installed
    calls.clear()
    llama_build.install_checked("x86-64-v4-amx", chosen=False)  # asked for by name: kept, whatever the check says
    assert calls == ["x86-64-v4-amx"]


def test_an_amx_build_that_cannot_be_compiled_here_gives_way_to_v4_unless_asked_for(monkeypatch, capsys) -> None:
    """A compiler without -mamx-int8, or no git for the patch: setup goes on with x86-64-v4."""
    def install(profile: str) -> Path:
        if profile == "x86-64-v4-amx":
            raise UserError("compiling llama-cpp-python 0.3.36 for x86-64-v4-amx failed (exit 1)")
        return Path(profile)

    monkeypatch.setattr(llama_build, "install", install)
    monkeypatch.setattr(llama_build.subprocess, "run", lambda *a, **k: pytest.fail("no AMX build to check"))
    assert llama_build.install_checked("x86-64-v4-amx", chosen=True) == Path("x86-64-v4")
    assert "could not be built here: installing the x86-64-v4 build" in capsys.readouterr().err
    with pytest.raises(UserError, match="failed"):
        llama_build.install_checked("x86-64-v4-amx", chosen=False)


def test_only_builds_that_compile_amx_code_are_patched(home: Path, monkeypatch) -> None:
    """native compiles ggml's AMX code only on an AMX CPU: elsewhere (arm64, AMD) it needs neither git nor the
    patch, and its wheel key is what it was."""
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: {"avx2", "fma"})
    assert not llama_build.patched("native") and not llama_build.patched("x86-64-v4")
    assert llama_build.patched("x86-64-v4-amx")
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: {"avx2", "fma", "amx_tile", "amx_int8"})
    assert llama_build.patched("native")


def test_a_level_this_cpu_lacks_is_refused_with_the_flags_it_misses(home: Path, monkeypatch) -> None:
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V3))
    with pytest.raises(UserError, match="this CPU lacks avx512f, .*which the x86-64-v4 build of llama.cpp needs"):
        llama_build.build("x86-64-v4")


def test_the_cpu_description_names_the_flags_llama_cpp_cares_about(monkeypatch) -> None:
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: {"avx2", "fma", "amx_int8", "sse2"})
    described = llama_build.describe_cpu()
    assert described.endswith(": avx2 fma amx_int8")


def test_a_build_for_another_cpu_is_refused_before_llama_cpp_loads(home: Path, monkeypatch) -> None:
    """A .venv set up on an AVX-512 machine and used on one without: a clear error, not SIGILL."""
    import json

    record = llama_build.build_record_path()
    monkeypatch.setattr(llama_build, "build_record_path", lambda: home / "llama-build.json")
    (home / "llama-build.json").write_text(json.dumps({"profile": "x86-64-v4",
                                                       "required_flags": list(llama_build.X86_64_V4)}))
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V3))
    with pytest.raises(UserError, match="built for x86-64-v4 and this CPU lacks avx512f.*Run `just setup` here"):
        llama_build.check_installed_build()
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V4))
    llama_build.check_installed_build()  # the same record on a CPU that has them: fine
    assert record != home / "llama-build.json"


def test_the_quantizer_refuses_a_build_for_another_cpu_before_its_child_starts(home: Path, tmp_path: Path,
                                                                               monkeypatch) -> None:
    import json

    import distillery.core.isolation as isolation
    from distillery.export import gguf

    monkeypatch.setattr(llama_build, "build_record_path", lambda: home / "llama-build.json")
    (home / "llama-build.json").write_text(json.dumps({"profile": "x86-64-v4",
                                                       "required_flags": list(llama_build.X86_64_V4)}))
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V3))
    monkeypatch.setattr(isolation, "Child", lambda *a, **k: pytest.fail("llama.cpp was loaded"))
    dst = tmp_path / "out-Q4_K_M.gguf"
    with pytest.raises(UserError, match="built for x86-64-v4 and this CPU lacks avx512f.*Run `just setup` here"):
        gguf.quantize_gguf(tmp_path / "in.gguf", dst, gguf.QuantType("q4_k_m"))
    assert not dst.exists()


def test_the_installed_build_holds_no_instruction_its_level_excludes() -> None:
    """What makes the builds safe: no AMX instruction in the portable levels, and in the AMX build a tile
    configuration read from a static constant, never from the stack (where GCC 12 dropped its stores and the
    first AMX matmul crashed, ggml-org/llama.cpp issue 20824); no AVX-512 in x86-64-v3 (a native build on an
    AVX-512 CPU holds ~15,000 zmm instructions)."""
    import re
    import shutil
    import subprocess

    from distillery.export.llama_build import installed_build

    spec = pytest.importorskip("llama_cpp")
    profile = installed_build().get("profile")
    if profile not in ("x86-64-v3", "x86-64-v4", "x86-64-v4-amx"):
        pytest.skip(f"the installed llama-cpp-python is not a build of a named level ({profile})")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    libraries = sorted((Path(spec.__file__).parent / "lib").glob("lib*.so"))
    assert {p.name for p in libraries} >= {"libllama.so", "libggml-cpu.so", "libggml-base.so"}
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", *map(str, libraries)], capture_output=True,
                             text=True, check=True).stdout
    assert "vfmadd" in listing  # the disassembly is real: AVX2/FMA code is there
    amx = re.findall(r"%tmm\d|\bldtilecfg\b|\btdpb\w+", listing)
    if profile == "x86-64-v4-amx":
        configs = re.findall(r"ldtilecfg\s+(\S+)", listing)
        assert len(amx) > 50 and configs and all(operand.endswith("(%rip)") for operand in configs), configs
    else:
        assert amx == [], f"{len(amx)} AMX instructions, e.g. {amx[:5]}"
    avx512 = re.findall(r"%zmm\d+|%k[0-7]\b", listing)
    assert (avx512 == []) if profile == "x86-64-v3" else len(avx512) > 1000, f"{profile}: {len(avx512)} AVX-512 operands"


def fake_compile(seconds: float, calls: list[str]):
    """run_as_group that 'compiles' for `seconds`: it writes a wheel where pip wheel's -w points."""
    def run(cmd: list[str], **_: object) -> int:
        import time

        calls.append("compiled")
        time.sleep(seconds)
        out = Path(cmd[cmd.index("-w") + 1])
        (out / f"llama_cpp_python-{llama_build.VERSION}-py3-none-linux_x86_64.whl").write_bytes(b"wheel")
        return 0
    return run


def test_two_setups_compiling_one_build_take_turns_and_share_its_wheel(home: Path, monkeypatch) -> None:
    """Two setups at once (two clones, a job array) each compiled the same build, truncated each other's log, and
    the second to finish deleted the wheel the first was installing. Now one compiles and the other waits for its
    wheel; the cached folder is readable by the machine's other users (mkdtemp made it 0700)."""
    import stat
    import threading

    calls: list[str] = []
    monkeypatch.setattr(llama_build, "fetch_sdist", lambda: home / "llama_cpp_python.tar.gz")
    monkeypatch.setattr(llama_build, "run_as_group", fake_compile(0.5, calls))
    wheels: list[Path] = []
    setups = [threading.Thread(target=lambda: wheels.append(llama_build.build("x86-64-v3"))) for _ in range(2)]
    for setup in setups:
        setup.start()
    for setup in setups:
        setup.join()
    assert calls == ["compiled"] and len(wheels) == 2 and wheels[0] == wheels[1] and wheels[0].is_file()
    assert stat.S_IMODE(wheels[0].parent.stat().st_mode) & 0o055 == 0o055  # group and others may read and enter


def test_a_stopped_compile_stops_every_process_it_started(tmp_path: Path) -> None:
    """Setup compiles in the background; stopped (Ctrl-C, a failed pip step), pip, CMake and the compilers went on
    for minutes. run_as_group takes its whole process group down with it."""
    import os
    import signal
    import time

    pid_file = tmp_path / "grandchild"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt):
            llama_build.run_as_group([sys.executable, "-c", script])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            break  # gone
        if state == "Z":
            break  # killed, waiting to be reaped by init
        time.sleep(0.1)
    else:
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the compile's own child process outlived it")


def test_a_cache_that_cannot_be_written_is_one_line_and_exit_2(capsys) -> None:
    """setup's tools (llama_build, the bundled models, the converter) ended in a PermissionError or a full-disk
    traceback; a bug still raises."""
    import errno

    from distillery.core.errors import exit_code
    from distillery.core.machine import cache_home

    def forbidden() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(cache_home() / "wheels"))

    def full() -> None:
        raise RuntimeError("SafetensorError: Error while serializing: IoError(No space left on device (os error 28))")

    assert exit_code(forbidden) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write there (Permission denied while writing") and "DISTILLERY_HOME" in err
    assert err.count("\n") == 1
    assert exit_code(full) == 2 and capsys.readouterr().err.startswith("error: the disk is full (No space left on device)")
    with pytest.raises(ZeroDivisionError):
        exit_code(lambda: 1 / 0)

    def elsewhere() -> None:  # a permission refused outside the cache and the venv: a bug, with its traceback
        raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")

    with pytest.raises(PermissionError):
        exit_code(elsewhere)


def test_a_distillery_home_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    """DISTILLERY_HOME naming a file: the compile's first mkdir ended in a NotADirectoryError traceback."""
    monkeypatch.setenv("DISTILLERY_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(llama_build, "check_cpu_supports", lambda profile: None)
    from distillery.core.errors import exit_code

    assert exit_code(lambda: llama_build.build("x86-64-v3")) == 2  # as main runs it (main also sets signal handlers)
    assert "Not a directory" in capsys.readouterr().err and (tmp_path / "a-file").read_text() == "not a folder"


def test_the_setup_stamp_names_the_build_this_machine_needs(home: Path, monkeypatch, capsys) -> None:
    """The stamp hashes `profile`: a native build is keyed by the CPU's flags, so a .venv moved to another CPU
    must set up again (it said up to date while llama.cpp refused the build made for the first CPU)."""
    monkeypatch.setenv("DISTILLERY_LLAMA_CPU", "native")
    printed = []
    for flags in (set(llama_build.X86_64_V4), set(llama_build.X86_64_V3)):
        monkeypatch.setattr(llama_build, "cpu_flags", lambda flags=flags: flags)
        assert llama_build.main(["profile"]) == 0
        printed.append(capsys.readouterr().out.strip())
    assert printed[0] != printed[1] and all(p.startswith("llama-cpp-python-") and "-native-" in p for p in printed)
