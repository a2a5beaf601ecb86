"""What the user hands over, read strictly: a file must be a UTF-8 text file, YAML may not repeat a key or nest
without end, and a path in the config may start with `~`. Every problem is a UserError naming the file (and the
line) and saying what to do.
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator

from distillery.core.errors import UserError

# A path from the config: `~` and `~user` expand as in a shell (a Hub id or bundled:<name> passes unchanged).
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]

MAX_YAML_DEPTH = 100  # a config nests about 5 levels; far deeper is a mistake, and Python's stack has a limit
# What aliases (*name) may repeat, in characters of the values they stand for: a `<<: *defaults` repeats a few
# hundred; 1,000 aliases of a 100 KB string (a "billion laughs") wrote a 100 MB config.yaml.
MAX_ALIASED_CHARS = 1 << 20


def require_file(path: Path, field: str, hint: str = "", pipe: bool = False) -> None:
    """Refuse a path that is missing or a directory, before reading it; `pipe`: a named pipe passes too (a shell's
    `-c <(envsubst < config.yaml)`)."""
    if path.is_dir():
        raise UserError(f"{field}: {path} is a directory, not a file. {hint}".strip())
    if pipe and path.is_fifo():
        return
    if path.exists() and not path.is_file():
        raise UserError(f"{field}: {path} is not a regular file (a device, socket or pipe). {hint}".strip())
    if not path.is_file():
        raise missing_path(str(path), path, field, hint)


def is_usable_file(path: Path) -> bool:
    """path.is_file(), and False where the system cannot even look the name up (a name over 255 bytes): the caller
    then says the file is not there, naming the setting, instead of an OSError."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def path_exists(path: Path) -> bool:
    """path.exists(), and False where the system cannot even look the name up (as is_usable_file)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def missing_path(item: str, path: Path, field: str, hint: str = "") -> UserError:
    """Why `path` (given as `item`) is neither a file nor a directory: a symlink loop, a dangling symlink, or
    nothing there."""
    if os.path.islink(path):
        try:
            path.stat()
        except OSError as err:
            if err.errno == errno.ELOOP:
                return UserError(f"{field}: {item} is a loop of symbolic links (it points to {os.readlink(path)}, "
                                 "which leads back to itself). Point it at the real file or directory.")
        return UserError(f"{field}: {item} is a symbolic link to {os.readlink(path)}, which does not exist. "
                         "Fix or remove the link.")
    shown = item if item.isprintable() and item.strip() else ascii(item)  # a name of spaces or zero-width characters
    return UserError(f"{field}: {shown} does not exist. Check the path (relative to {Path.cwd()}). {hint}".strip())


def read_utf8(path: Path, limit: int | None = None) -> str:
    """The text of a file the user wrote; unreadable, larger than `limit` bytes (read no further), or not UTF-8
    (a UTF-16 file, a binary) is a UserError."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(-1 if limit is None else limit + 1)
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror or err}). Check its permissions.") from None
    if limit is not None and len(data) > limit:
        raise UserError(f"{path} is larger than {limit >> 20} MB, far more than a config holds: check that it is "
                        "the file you meant.")
    try:
        return data.decode("utf-8-sig")  # a UTF-8 byte order mark is still UTF-8
    except UnicodeDecodeError as err:
        raise not_utf8(path, f"byte {err.start}", data[:2]) from None


def not_utf8(path: Path, where: str, head: bytes) -> UserError:
    """The error for a file that is not UTF-8 (Windows' CP949 or UTF-16): `where` (its byte, maybe its line)
    could not be decoded; `head`, the file's first bytes, names UTF-16 when it starts with its byte order mark."""
    utf16 = " It looks like UTF-16 (Windows \"Unicode\")." if head[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return UserError(f"{path} is not UTF-8 text ({where} cannot be decoded).{utf16} Save it as UTF-8 and run again.")


MAX_YAML_BYTES = 16 << 20  # a config or an accelerate config: a few KB


def read_yaml_file(path: Path) -> Any:
    """A YAML file the user wrote, read as `parse_yaml` reads text."""
    return parse_yaml(read_utf8(path, MAX_YAML_BYTES), str(path))


def parse_yaml(text: str, where: str) -> Any:
    """YAML from the user (`where` names it in messages): a repeated key, nesting deeper than MAX_YAML_DEPTH or
    invalid syntax is a UserError with the line."""
    stream = io.StringIO(text)
    stream.name = where  # PyYAML names the stream in every error mark
    try:
        loader = StrictLoader(stream)  # reads the first characters already: a control character fails here
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise UserError(f"{where}: not valid YAML: {err}") from None


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key repeated in one mapping (plain YAML keeps the last one silently)
    and nesting deeper than MAX_YAML_DEPTH (its composer recurses once per level)."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self.depth = self.aliased = 0
        self.sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent) and self.peek_event().anchor in self.anchors:
            self.aliased += self.node_chars(self.anchors[self.peek_event().anchor])
            if self.aliased > MAX_ALIASED_CHARS:
                raise yaml.composer.ComposerError(None, None, f"its aliases (*name) repeat more than "
                                                  f"{MAX_ALIASED_CHARS >> 20} MB of values; write what they stand for "
                                                  "once", self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep; a "
                                                  "config needs a handful", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def node_chars(self, node: Any) -> int:
        """Characters of every scalar under `node`, aliases expanded (each node sized once: linear, however the
        aliases nest)."""
        if id(node) not in self.sizes:
            if isinstance(node, yaml.ScalarNode):
                self.sizes[id(node)] = len(node.value)
            else:
                children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
                self.sizes[id(node)] = sum(self.node_chars(child) for child in children)
        return self.sizes[id(node)]

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        self.refuse_repeated_keys(node)
        return super().construct_mapping(node, deep=deep)

    def refuse_repeated_keys(self, node: Any) -> None:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"found the key {key!r} a second time (first on line {first_line[key] + 1}); write it once "
                    "(merge the two entries)", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
