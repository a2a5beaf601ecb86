"""export/converter.py: extracting llama.cpp's converter from a llama-cpp-python sdist, atomically and once."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from distillery.export import converter
from distillery.core.errors import UserError


def write_sdist(path: Path, members: dict[str, str]) -> Path:
    """A .tar.gz laid out like the llama-cpp-python sdist (only the given files)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


SDIST_FILES = {
    "vendor/llama.cpp/convert_hf_to_gguf.py": "print('converter')\n",
    "vendor/llama.cpp/conversion/__init__.py": "",
    "vendor/llama.cpp/gguf-py/gguf/__init__.py": "VENDORED = True\n",
    "vendor/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt": "numpy\n",
    "vendor/llama.cpp/LICENSE": "MIT\n",
    "vendor/llama.cpp/src/llama.cpp": "// not needed by the converter\n",
    "llama_cpp/llama.py": "# the binding, not needed\n",
}


def test_extract_takes_only_the_converter_files(tmp_path: Path) -> None:
    sdist = write_sdist(tmp_path / "s.tar.gz", SDIST_FILES)
    target = tmp_path / "share" / "llama.cpp"
    converter.extract_converter(sdist, target, "9.9.9")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["LICENSE", "VERSION", "conversion/__init__.py", "convert_hf_to_gguf.py",
                     "gguf-py/gguf/__init__.py", "requirements/requirements-convert_hf_to_gguf.txt"]
    assert converter.installed_version(target) == "9.9.9"
    assert [p.name for p in target.parent.iterdir()] == ["llama.cpp"]  # no temp directory left behind


def test_reinstall_replaces_the_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "llama.cpp"
    converter.extract_converter(write_sdist(tmp_path / "a.tar.gz", SDIST_FILES), target, "1.0")
    (target / "stale.py").write_text("old")
    converter.extract_converter(write_sdist(tmp_path / "b.tar.gz", SDIST_FILES), target, "2.0")
    assert converter.installed_version(target) == "2.0" and not (target / "stale.py").exists()


def test_an_archive_without_the_converter_is_refused_and_nothing_is_installed(tmp_path: Path) -> None:
    sdist = write_sdist(tmp_path / "s.tar.gz", {"vendor/llama.cpp/README.md": "no converter"})
    target = tmp_path / "llama.cpp"
    with pytest.raises(UserError, match="convert_hf_to_gguf.py"):
        converter.extract_converter(sdist, target, "1.0")
    assert not target.exists() and list(tmp_path.iterdir()) == [sdist]


def test_missing_converter_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLERY_LLAMA_CPP", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="just setup"):
        converter.converter_script()


def test_converter_env_puts_vendored_gguf_first_only_for_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    env = converter.converter_env()
    paths = env["PYTHONPATH"].split(":")
    assert paths[0].endswith("gguf-py") and paths[-1] == "/somewhere" and env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.integration
def test_installed_converter_starts_beside_the_pypi_gguf_package() -> None:
    """The real install (just setup): the converter imports its own gguf-py while the venv's `gguf` stays the
    PyPI release transformers' GGUF loader uses."""
    from importlib import metadata

    import gguf

    models = converter.check_converter()
    assert "LlamaForCausalLM" in models and "Qwen2ForCausalLM" in models
    assert metadata.version("gguf") == "0.19.0" and "site-packages" in gguf.__file__


def test_the_supported_list_is_kept_until_the_converter_changes(tmp_path: Path, monkeypatch) -> None:
    """Every export asked the converter for its list (3 s of CPU); it is kept beside the converter, keyed by the
    script's version, size and time, and asked again when any of them changes or the kept file is damaged."""
    import os

    (tmp_path / converter.SCRIPT).write_text("print('converter')\n")
    (tmp_path / converter.STAMP).write_text("9.9.9\n")
    monkeypatch.setenv("DISTILLERY_LLAMA_CPP", str(tmp_path))
    calls = []
    monkeypatch.setattr(converter, "check_converter", lambda: calls.append(1) or ["LlamaForCausalLM"])
    assert converter.supported_models() == ["LlamaForCausalLM"] and converter.supported_models() == ["LlamaForCausalLM"]
    assert len(calls) == 1
    os.utime(tmp_path / converter.SCRIPT, ns=(1, 1))  # another converter file
    assert converter.supported_models() == ["LlamaForCausalLM"] and len(calls) == 2
    (tmp_path / converter.SUPPORTED).write_text('{"key": 3')
    assert converter.supported_models() == ["LlamaForCausalLM"] and len(calls) == 3


def test_an_empty_distillery_llama_cpp_is_the_environment_s_own_place(monkeypatch) -> None:
    """Set but empty, it named the working directory, where an install would replace "."."""
    import sys

    monkeypatch.setenv("DISTILLERY_LLAMA_CPP", "")
    assert converter.install_dir() == Path(sys.prefix) / "share" / "llama.cpp"
