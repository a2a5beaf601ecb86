"""export/llama_build.py without compiling: which CPU level is built, with which CMake arguments, and that a
cached wheel is reused only by the build it was made for."""

from __future__ import annotations

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


def test_x86_64_machines_get_the_portable_level_unless_told_otherwise(home: Path, monkeypatch) -> None:
    monkeypatch.setattr(llama_build.platform, "machine", lambda: "x86_64")
    assert llama_build.chosen_profile() == "x86-64-v3"
    monkeypatch.setenv("DISTILLERY_LLAMA_CPU", "x86-64-v4")
    assert llama_build.chosen_profile() == "x86-64-v4"
    monkeypatch.setenv("DISTILLERY_LLAMA_CPU", "skylake")
    with pytest.raises(UserError, match="DISTILLERY_LLAMA_CPU=skylake: unknown; use one of x86-64-v3, x86-64-v4, native"):
        llama_build.chosen_profile()


def test_portable_levels_never_compile_native_avx512_or_amx_code(home: Path) -> None:
    v3, v4 = llama_build.cmake_args("x86-64-v3"), llama_build.cmake_args("x86-64-v4")
    for args in (v3, v4):
        assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AMX_INT8=OFF" in args and "-DGGML_AMX_TILE=OFF" in args
        assert "-DLLAVA_BUILD=OFF" in args and f"-DCMAKE_PROJECT_INCLUDE={llama_build.HOOK}" in args
    assert "-DGGML_AVX512=OFF" in v3 and "-DGGML_AVX2=ON" in v3
    assert "-DGGML_AVX512=ON" in v4 and "-DGGML_AVX512_BF16=ON" in v4
    assert "set(LLAMA_BUILD_COMMON OFF" in llama_build.HOOK.read_text()


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


def test_a_level_this_cpu_lacks_is_refused_with_the_flags_it_misses(home: Path, monkeypatch) -> None:
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: set(llama_build.X86_64_V3))
    with pytest.raises(UserError, match="this CPU lacks avx512f, .*which the x86-64-v4 build of llama.cpp needs"):
        llama_build.build("x86-64-v4")


def test_the_cpu_description_names_the_flags_llama_cpp_cares_about(monkeypatch) -> None:
    monkeypatch.setattr(llama_build, "cpu_flags", lambda: {"avx2", "fma", "amx_int8", "sse2"})
    described = llama_build.describe_cpu()
    assert described.endswith(": avx2 fma amx_int8")


def test_the_installed_portable_build_holds_no_avx512_or_amx_instruction() -> None:
    """What makes the x86-64-v3 build safe on every CPU, AMX machines included: no instruction of those kinds
    exists in the libraries (a native build on an AVX-512 CPU holds ~15,000 zmm instructions)."""
    import re
    import shutil
    import subprocess

    from distillery.export.llama_build import installed_build

    spec = pytest.importorskip("llama_cpp")
    if installed_build().get("profile") != "x86-64-v3":
        pytest.skip("the installed llama-cpp-python is not the x86-64-v3 build")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    libraries = sorted((Path(spec.__file__).parent / "lib").glob("lib*.so"))
    assert {p.name for p in libraries} >= {"libllama.so", "libggml-cpu.so", "libggml-base.so"}
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", *map(str, libraries)], capture_output=True,
                             text=True, check=True).stdout
    assert "vfmadd" in listing  # the disassembly is real: AVX2/FMA code is there
    found = re.findall(r"%zmm\d+|%k[0-7]\b|%tmm\d|\bldtilecfg\b|\btdpb\w+", listing)
    assert found == [], f"{len(found)} AVX-512/AMX operands, e.g. {found[:5]}"
