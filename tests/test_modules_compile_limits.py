"""The shipped compiler modules at their limits: files they must not read, nesting that
overflows a compiler's stack, output that is not valid UTF-8. A real service, as in
test_modules_compile.py. Needs node and ``npm ci --prefix compilers``."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ServiceProcess
from tests.test_modules_compile import compile_error, compile_ok, need_compilers, opts, with_include


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\0" + b"\0" * width * 3 for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    need_compilers()
    root = tmp_path_factory.mktemp("limits")
    include = root / "inc"
    include.mkdir()
    (root / "secret.less").write_text("@secret: 1;\n")
    os.symlink(root / "secret.less", include / "secret.less")
    (include / "ok.less").write_text("@ok: 2;\n")
    (root / "real.png").write_bytes(png(7, 5))
    svc = with_include(root, "less", include)
    yield svc
    svc.stop()


def test_less_image_functions_read_no_file(svc: ServiceProcess) -> None:
    image = svc.root / "real.png"
    sources = opts(sources=json.dumps({str(image).lstrip("/"): "not an image"}))
    for fn in ("image-size", "image-width", "image-height"):
        reply = compile_error(svc, "less", f".a {{ w: {fn}('{image}'); }}", sources)
        assert reply.startswith("400: input.less:1:"), reply
        assert f"{fn}() is not allowed" in reply, reply
        reply = compile_error(svc, "less", f".a {{ w: {fn}('{image}'); }}")
        assert f"{fn}() is not allowed" in reply, reply


def test_less_import_through_symlink_out_of_include_folder(svc: ServiceProcess) -> None:
    include = opts(include=str(svc.root / "inc"))
    assert compile_ok(svc, "less", '@import "ok.less";\n.a { b: @ok; }', include) == (
        ".a {\n  b: 2;\n}\n"
    )
    for source in ('@import "secret.less";', ".a { b: data-uri('secret.less'); }"):
        reply = compile_error(svc, "less", source, include)
        assert reply == "403: /secret.less: outside the include folder", reply


def test_minify_css_nesting_limit(svc: ServiceProcess) -> None:
    deep = ".a{" * 5000 + "b:c" + "}" * 5000
    at_rules = "@media screen{" * 1500 + "a{b:c}" + "}" * 1500
    with ThreadPoolExecutor(4) as pool:  # compiles in flight with it are not disturbed
        others = [pool.submit(compile_ok, svc, "scss", ".a { b: c }") for _ in range(3)]
        for source in (deep, at_rules):
            reply = compile_error(svc, "minify", source, opts(type="css"))
            assert reply == "400: input.css: nested more than 2000 levels deep (the limit)", reply
        assert all(f.result() == ".a {\n  b: c;\n}" for f in others)
    ok = compile_ok(svc, "minify", ".a{" * 2000 + "b:c" + "}" * 2000, opts(type="css"))
    assert ok.startswith(".a{& .a{") and ok.endswith("b:c" + "}" * 2000)
    # Brackets in strings and comments are not nesting.
    quoted = '.a{content:"' + "{" * 3000 + '"}/*' + "(" * 3000 + "*/"
    assert compile_ok(svc, "minify", quoted, opts(type="css")).startswith('.a{content:"{{{')


@pytest.mark.parametrize(
    ("module", "source", "options"),
    [
        ("scss", ".a{" * 20000 + "b:c" + "}" * 20000, b""),
        ("sass", "a\n  b: " + "(" * 20000 + "1" + ")" * 20000, b""),
        ("typescript", "x = " + "(" * 20000 + "1" + ")" * 20000, b""),
        ("coffee", "x = " + "(" * 1000 + "1" + ")" * 1000, b""),
        # CoffeeScript took 20 s over these (a 504), before its stack overflowed: refused first
        ("coffee", "x = " + "[" * 20000 + "]" * 20000, b""),
        ("coffee", "".join(" " * n + "if a\n" for n in range(1100)) + " " * 1100 + "b()", b""),
        ("minify", "x = " + "(" * 20000 + "1" + ")" * 20000, opts(type="js")),
    ],
)
def test_deeply_nested_source_is_400(
    svc: ServiceProcess, module: str, source: str, options: bytes
) -> None:
    reply = compile_error(svc, module, source, options)
    lang = "scss" if module == "scss" else module
    assert reply.startswith(f"400: {lang}: input nested too deeply"), reply[:300]


def test_coffee_nesting_limit_counts_code_only(svc: ServiceProcess) -> None:
    brackets = "(" * 3000 + "[" * 3000
    source = f"a = \"{brackets}\"\nb = '{brackets}' # {brackets}\n###\n{brackets}\n###\n"
    assert "var a, b;" in compile_ok(svc, "coffee", source)
    deep = "x = " + "[" * 900 + "]" * 900  # under the limit: compiled
    assert compile_ok(svc, "coffee", deep, opts(bare="1")).startswith("var x;")


def test_values_too_large_for_the_compiler_are_400(svc: ServiceProcess) -> None:
    # A string doubled 40 times: node's "Invalid string length" was a 500 (the service's).
    source = '$s: "x"; @for $i from 1 through 40 { $s: $s + $s; } .a { b: str-length($s); }'
    reply = compile_error(svc, "scss", source)
    assert reply == "400: scss: the source makes a value too large (Invalid string length)"
    # Less lost the message of its own error: "SyntaxError: undefined".
    reply = compile_error(svc, "less", ".m(@n) when (@n > 0) { .m(@n - 1); }\n.a { .m(5000); }")
    assert reply.startswith("400: input.less:2:6: Error: the compiler failed without a message")


def test_lone_surrogate_in_output_is_replaced(svc: ServiceProcess) -> None:
    assert compile_ok(svc, "pug", "p= String.fromCharCode(0xd800)") == "<p>\ufffd</p>"
    reply = compile_error(svc, "pug", "- throw new Error('x' + String.fromCharCode(0xdc00))")
    assert reply.startswith("400: input.pug: ") and reply.endswith("x\ufffd"), reply
    # The context of a runtime error comes from the template, not from /input.pug on disk.
    assert "could not read" not in reply and "> 1| - throw" in reply, reply
