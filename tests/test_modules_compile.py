"""The shipped compiler modules, end to end: real sources in, the official compilers' output
out, over a real service's TCP port. Needs node and ``npm ci --prefix compilers``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, ServiceProcess, wait_until

COMPILERS = REPO / "compilers"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One service for the whole file: the node process warms up once."""
    need_compilers()
    root = tmp_path_factory.mktemp("compile")
    include = root / "styles"
    (include / "sub").mkdir(parents=True)
    (include / "_palette.scss").write_text("$brand: #336699;\n")
    (include / "sub" / "_size.scss").write_text("$gap: 4px;\n")
    (include / "vars.less").write_text("@brand: #336699;\n")
    (root / "secret.scss").write_text("$secret: 1;\n")
    os.symlink(root / "secret.scss", include / "link.scss")
    svc = with_include(root, "scss", include)
    yield svc
    svc.stop()


def need_compilers() -> None:
    """Skip the test where node or the compilers are not installed."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (COMPILERS / "node_modules").is_dir():
        pytest.skip(f"compilers not installed: npm ci --prefix {COMPILERS}")


def with_include(root: Path, module: str, include: Path) -> ServiceProcess:
    """A service whose shipped ``module`` may read files in ``include`` (its INCLUDE_DIRS)."""
    svc = ServiceProcess(root)
    path = svc.modules / f"{module}.py"
    path.write_text(
        path.read_text().replace(
            "INCLUDE_DIRS: list[str] = []", f"INCLUDE_DIRS: list[str] = [{str(include)!r}]"
        )
    )
    return svc.start()


def opts(**options: str) -> bytes:
    return b"?" + urllib.parse.urlencode(options).encode() + b":"


def compile_ok(svc: ServiceProcess, module: str, source: str, options: bytes = b"") -> str:
    reply = svc.call(module.encode() + b":" + options + source.encode())
    assert not re.match(rb"[45][0-9]{2}:", reply), reply  # the original clients' error test
    return reply.decode()


def compile_error(svc: ServiceProcess, module: str, source: str, options: bytes = b"") -> str:
    reply = svc.call(module.encode() + b":" + options + source.encode()).decode()
    assert reply[:3].isdigit() and reply[3:5] == ": ", reply
    return reply


def run_js(tmp_path: Path, code: str) -> str:
    script = tmp_path / "out.js"
    script.write_text(code)
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- Sass ----------------------------------------------------------------------------------

SCSS = """\
@use "sass:math";
$base: 16px;
%reset { margin: 0; padding: 0; }
@mixin pad($n) { padding: math.div($base, $n); }
.card {
  @extend %reset;
  @include pad(4);
  .title { font-size: $base * 1.5; &:hover { color: red; } }
}
"""
SCSS_CSS = """\
.card {
  margin: 0;
  padding: 0;
}

.card {
  padding: 4px;
}
.card .title {
  font-size: 24px;
}
.card .title:hover {
  color: red;
}"""


def test_scss_modern_syntax(svc: ServiceProcess) -> None:
    assert compile_ok(svc, "scss", SCSS) == SCSS_CSS


def test_scss_minify(svc: ServiceProcess) -> None:
    out = compile_ok(svc, "scss", SCSS, opts(minify="1"))
    assert (
        out == ".card{margin:0;padding:0}.card{padding:4px}.card .title{font-size:24px}"
        ".card .title:hover{color:red}"
    )


def test_scss_use_and_forward_between_sources_in_one_request(svc: ServiceProcess) -> None:
    sources = {
        "_theme.scss": '@forward "colors" show $primary;\n@forward "sizes";',
        "colors.scss": "$primary: #112233; $hidden: #000;",
        "sizes.scss": "$radius: 3px;",
    }
    source = '@use "theme";\n.btn { color: theme.$primary; border-radius: theme.$radius; }'
    out = compile_ok(svc, "scss", source, opts(sources=json.dumps(sources)))
    assert out == ".btn {\n  color: #112233;\n  border-radius: 3px;\n}"
    hidden = source + "\n.x { color: theme.$hidden; }"
    error = compile_error(svc, "scss", hidden, opts(sources=json.dumps(sources)))
    assert error == "400: input.scss:3:13: Undefined variable."


def test_scss_include_folder_in_the_allow_list(svc: ServiceProcess) -> None:
    folder = svc.root / "styles"
    source = '@use "palette" as p;\n@use "sub/size";\n.a { color: p.$brand; margin: size.$gap; }'
    out = compile_ok(svc, "scss", source, opts(include=str(folder)))
    assert out == ".a {\n  color: #336699;\n  margin: 4px;\n}"


def test_scss_include_folder_not_allowed_and_no_escape(svc: ServiceProcess) -> None:
    assert compile_error(svc, "scss", ".a{}", opts(include=str(svc.root))).startswith("403: ")
    escape = '@use "../secret";\n.a { b: secret.$secret; }'
    reply = compile_error(svc, "scss", escape, opts(include=str(svc.root / "styles")))
    assert reply.startswith("400: input.scss:1:1: Can't find stylesheet"), reply
    for url in (svc.root / "secret", f"file://{svc.root}/secret"):
        reply = compile_error(svc, "scss", f'@use "{url}";')
        assert reply.startswith("400: input.scss:1:1: Can't find stylesheet"), reply
    # A symlink out of the folder is refused as LESS and Pug refuse it (it was a 400).
    reply = compile_error(svc, "scss", '@use "link";', opts(include=str(svc.root / "styles")))
    assert reply == "403: /link.scss: outside the include folder", reply


def test_sass_output_has_no_bom_nor_charset(svc: ServiceProcess) -> None:
    # A BOM started minified output with non-ASCII in it: inlined in a page, it broke the
    # first rule. Non-minified output started with @charset.
    source = '.a::before { content: "\u2192"; }'
    assert compile_ok(svc, "scss", source, opts(minify="1")) == '.a::before{content:"\u2192"}'
    assert compile_ok(svc, "sass", '.a::before\n  content: "\u2192"') == (
        '.a::before {\n  content: "\u2192";\n}'
    )


def test_scss_syntax_error_names_line_and_column(svc: ServiceProcess) -> None:
    reply = compile_error(
        svc, "scss", ".a {\n  color: red\n  .b { x: 1 }\n", opts(filename="app.scss")
    )
    assert reply.startswith("400: app.scss:3:"), reply


def test_sass_indented_syntax(svc: ServiceProcess) -> None:
    source = '@use "sass:math"\n=big\n  font-size: math.div(30px, 2)\n'
    source += "nav\n  +big\n  a\n    color: blue\n"
    assert compile_ok(svc, "sass", source) == (
        "nav {\n  font-size: 15px;\n}\nnav a {\n  color: blue;\n}"
    )
    assert compile_error(svc, "sass", "nav\n  color: (blue\n") == (
        '400: input.sass:2:15: expected ")".'
    )


# --- LESS ----------------------------------------------------------------------------------

LESS = """\
@gap: 8px;
@wide: 600px;
.bordered(@w: 1px) { border: @w solid black; }
.size(@a) when (@a > 10px) { height: @a; }
.size(@a) when (@a <= 10px) { height: (@a * 2); }
.box { width: calc(100% - 8px); margin: @gap * 2; .bordered(2px); .size(5px); }
.panel:extend(.box) { color: #111; }
// Less 4 divides only inside parentheses: the second call gets "600px / 2", no guard matches.
.wide { .size((@wide / 2)); .size(@wide / 2); }
"""
LESS_CSS = """\
.box,
.panel {
  width: calc(100% - 8px);
  margin: 16px;
  border: 2px solid black;
  height: 10px;
}
.panel {
  color: #111;
}
.wide {
  height: 300px;
}
"""


def test_less_4_semantics(svc: ServiceProcess) -> None:
    assert compile_ok(svc, "less", LESS) == LESS_CSS


def test_less_import_from_sources_and_minify(svc: ServiceProcess) -> None:
    sources = json.dumps({"vars.less": "@brand: #336699;"})
    out = compile_ok(svc, "less", '@import "vars";\n.a { color: @brand; }', opts(sources=sources))
    assert out == ".a {\n  color: #336699;\n}\n"
    out = compile_ok(svc, "less", LESS, opts(minify="1"))
    assert out == (
        ".box,.panel{border:2px solid #000;width:calc(100% - 8px);height:10px;margin:16px}"
        ".panel{color:#111}.wide{height:300px}"
    )


def test_less_refuses_files_and_plugins(svc: ServiceProcess) -> None:
    assert compile_error(svc, "less", '@import (inline) "/etc/passwd";').startswith(
        "400: input.less:1:1: FileError"
    )
    assert "@plugin is not allowed" in compile_error(svc, "less", '@plugin "clean-css";')


def test_less_syntax_error(svc: ServiceProcess) -> None:
    reply = compile_error(svc, "less", ".a {\n  color: red;\n  width: @;\n}\n")
    assert reply == "400: input.less:3:10: ParseError: Unrecognised input"
    reply = compile_error(svc, "less", ".a {\n  width: @nope;\n}\n")
    assert reply == "400: input.less:2:10: NameError: variable @nope is undefined"


# --- TypeScript ----------------------------------------------------------------------------

TS = """\
enum Color { Red = "red", Green = "green" }
interface User { name: string; address?: { city?: string } }
class Greeter {
  #count = 0;
  constructor(private readonly prefix: string) {}
  greet(user: User): string {
    this.#count++;
    return `${this.prefix} ${user.name} from ${user.address?.city ?? "nowhere"} #${this.#count}`;
  }
}
async function main(): Promise<void> {
  const g = new Greeter("hi");
  const wait = (ms: number) => new Promise<number>((r) => setTimeout(() => r(ms), ms));
  console.log(g.greet({ name: "Ann", address: { city: "Oslo" } }));
  console.log(g.greet({ name: "Bob" }));
  console.log(Color.Green, await wait(1));
}
main();
"""


def test_typescript_output_runs(svc: ServiceProcess, tmp_path: Path) -> None:
    for target in ("es2020", "es2015", "esnext"):
        js = compile_ok(svc, "typescript", TS, opts(target=target))
        assert "interface" not in js and ": string" not in js
        assert run_js(tmp_path, js) == "hi Ann from Oslo #1\nhi Bob from nowhere #2\ngreen 1\n"
    assert "?." not in compile_ok(svc, "typescript", TS, opts(target="es2019"))


def test_tsx(svc: ServiceProcess, tmp_path: Path) -> None:
    source = (
        "const React = { createElement: (t: string, p: object | null, ...c: string[]) =>"
        " `<${t}>${c.join('')}</${t}>` };\n"
        "const name: string = 'x';\nconsole.log(<b>hi {name}</b>);\n"
    )
    js = compile_ok(svc, "typescript", source, opts(filename="view.tsx"))
    assert run_js(tmp_path, js) == "<b>hi x</b>\n"


def test_typescript_targets_and_module_kinds(svc: ServiceProcess) -> None:
    source = "export const a: number = 1;\n"
    for kind in ("esm", "ESM", "es2020", "esnext"):  # were CommonJS, silently
        assert compile_ok(svc, "typescript", source, opts(module=kind)) == (
            "export const a = 1;\n"
        ), kind
    assert "exports.a = 1" in compile_ok(svc, "typescript", source, opts(module="commonjs"))
    assert compile_error(svc, "typescript", source, opts(module="es2021")).startswith(
        "400: unknown module es2021 (cjs, commonjs, esm, "
    )
    assert compile_ok(svc, "typescript", "let b = 1;", opts(target="ES5")) == "var b = 1;\n"
    for target in ("json", "es3", "latest"):  # json was a 500 "Debug Failure"
        reply = compile_error(svc, "typescript", source, opts(target=target))
        assert reply.startswith(f"400: unknown target {target} (es5, es6, es2015, "), reply


def test_typescript_syntax_error(svc: ServiceProcess) -> None:
    reply = compile_error(svc, "typescript", "const a = 1;\nlet b: = 2;\n", opts(filename="m.ts"))
    assert reply == "400: m.ts:2:8: error TS1110: Type expected."


# --- CoffeeScript --------------------------------------------------------------------------

COFFEE = """\
class Animal
  constructor: (@name) ->
  speak: -> "#{@name} speaks"
square = (x) -> x * x
{a, b...} = {a: 1, c: 2, d: 3}
console.log new Animal('Rex').speak(), (square n for n in [1..3]).join(','), Object.keys(b).join('')
"""


def test_coffeescript_2(svc: ServiceProcess, tmp_path: Path) -> None:
    js = compile_ok(svc, "coffee", COFFEE)
    assert "class Animal" in js  # CoffeeScript 2 emits ES classes
    assert js.startswith("(function() {")
    assert run_js(tmp_path, js) == "Rex speaks 1,4,9 cd\n"
    assert not compile_ok(svc, "coffee", COFFEE, opts(bare="1")).startswith("(function")


def test_coffeescript_syntax_error(svc: ServiceProcess) -> None:
    reply = compile_error(svc, "coffee", "a = 1\nb = (\n")
    assert reply.startswith("400: input.coffee:2:5: error: missing )"), reply


# --- Pug / Jade ----------------------------------------------------------------------------

PUG = """\
doctype html
html
  body
    h1.title= title
    ul
      each item in items
        li(class=item.done ? 'done' : undefined)= item.name
    if user
      p Hello #{user}!
"""


def test_pug_with_variables_and_jade_alias(svc: ServiceProcess) -> None:
    variables = {"title": "Todo <1>", "items": [{"name": "a", "done": True}, {"name": "b"}],
                 "user": "Ann"}  # fmt: skip
    expected = (
        '<!DOCTYPE html><html><body><h1 class="title">Todo &lt;1&gt;</h1><ul>'
        '<li class="done">a</li><li>b</li></ul><p>Hello Ann!</p></body></html>'
    )
    for module in ("pug", "jade"):
        assert compile_ok(svc, module, PUG, opts(vars=json.dumps(variables))) == expected
    assert compile_ok(svc, "pug", "p= 1 + 1") == "<p>2</p>"


def test_pug_include_only_from_sources(svc: ServiceProcess) -> None:
    sources = json.dumps({"nav.pug": "nav home"})
    assert compile_ok(svc, "pug", "div\n  include nav", opts(sources=sources)) == (
        "<div><nav>home</nav></div>"
    )
    assert "no such file" in compile_error(svc, "pug", "include /etc/passwd")


def test_pug_syntax_error(svc: ServiceProcess) -> None:
    reply = compile_error(svc, "pug", "div\n  p(class=)\n")
    assert reply == "400: input.pug:2:11: PUG:SYNTAX_ERROR: Syntax Error: Unexpected token"
    assert compile_error(svc, "pug", "div\n  - var x = ;\n").startswith("400: input.pug")
    assert compile_error(svc, "pug", "p", opts(vars="[1]")).startswith("400: vars:")


# A template is JavaScript: these ran a program, wrote a file or reached node's internals
# as the service's user, for anybody who could send pug:TEMPLATE (or queue it).
ESCAPES = [
    "p= process.mainModule.require('child_process').execSync('id > {marker}; id').toString()",
    "- process.mainModule.require('fs').writeFileSync('{marker}', 'written')",
    "p= typeof global.process.binding('spawn_sync').spawn",
    "- this.constructor.constructor('return process')().mainModule.require('fs')"
    ".writeFileSync('{marker}', 'written')",
]


@pytest.mark.parametrize("module", ["pug", "jade"])
@pytest.mark.parametrize("template", ESCAPES)
def test_templates_cannot_run_programs_nor_write_files(
    svc: ServiceProcess, tmp_path: Path, module: str, template: str
) -> None:
    marker = tmp_path / "marker"
    reply = compile_error(svc, module, template.format(marker=marker))
    assert reply.startswith("400: input.pug: /input.pug:1\n"), reply
    assert "is not available to a template" in reply, reply
    assert not marker.exists()


def test_a_template_changes_nothing_for_the_others(svc: ServiceProcess) -> None:
    # Each template has a context of its own: one that rewrites the built-ins changes
    # neither the other templates nor the compilers (in node's own realm, it changed both).
    polluter = "- Object.prototype.polluted = 'yes'; String.prototype.trim = () => 'bad'\np done"
    assert compile_ok(svc, "pug", polluter) == "<p>done</p>"
    assert compile_ok(svc, "jade", "p= typeof polluted + ' [' + ' a '.trim() + ']'") == (
        "<p>undefined [a]</p>"
    )
    assert compile_ok(svc, "scss", ".a { b: c }") == ".a {\n  b: c;\n}"


MIXINS = "mixin list(items)\n  ul\n    each item in items\n      li= item\n"


def test_pug_mixins_includes_and_locals_still_work(svc: ServiceProcess) -> None:
    layout = "html\n  body\n    block content\n    include footer"
    sources = {"layout.pug": layout, "footer.pug": "footer= site", "mixins.pug": MIXINS}
    page = "extends layout\ninclude mixins\nblock content\n  +list(items)\n  p= items.length"
    variables = {"site": "Ann's", "items": ["a", "<b>"]}
    options = opts(sources=json.dumps(sources), vars=json.dumps(variables))
    expected = (
        "<html><body><ul><li>a</li><li>&lt;b&gt;</li></ul><p>2</p>"
        "<footer>Ann's</footer></body></html>"
    )
    for module in ("pug", "jade"):
        assert compile_ok(svc, module, page, options) == expected
    # Rendered again from the cache, with other variables.
    again = opts(sources=json.dumps(sources), vars=json.dumps({"site": "x", "items": []}))
    reply = compile_ok(svc, "pug", page, again)
    assert reply == "<html><body><ul></ul><p>0</p><footer>x</footer></body></html>"


def node_switches(pid: int) -> list[str]:
    """The command line node was started with (setpriv became node: it is node's)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def fs_reads(pid: int) -> set[str]:
    return {s.partition("=")[2] for s in node_switches(pid) if s.startswith("--allow-fs-read=")}


def test_node_runs_under_its_permission_model(svc: ServiceProcess) -> None:
    assert compile_ok(svc, "less", ".a { b: c }") == ".a {\n  b: c;\n}\n"
    for pid in svc.stats()["module_stats"]["less"]["node_pids"]:
        switches = node_switches(pid)
        assert {"--permission", "--experimental-permission"} & set(switches), switches
        compilers = COMPILERS.resolve()
        include = os.path.realpath(svc.root / "styles")  # the scss module's INCLUDE_DIRS
        own = {str(compilers / "server.js"), str(compilers / "node_modules")}
        assert fs_reads(pid) == {*own, include}
        granted = [s for s in switches if s.startswith("--allow-") and not s.startswith(
            ("--allow-fs-read=", "--allow-addons"))]  # fmt: skip
        assert granted == [], switches  # no writes, no programs, no workers


def test_include_folders_are_what_node_may_read(
    make_service, modules_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    need_compilers()
    env_folder, added = (Path(os.path.realpath(tmp_path / name)) for name in ("env", "added"))
    env_folder.mkdir()
    added.mkdir()
    (env_folder / "nav.pug").write_text("nav from the environment's folder")
    (added / "nav.pug").write_text("nav from a folder added later")
    monkeypatch.setenv("BGSERVICE_INCLUDE_DIRS", str(env_folder))
    service = make_service()
    reply = service.call(b"pug:" + opts(include=str(env_folder)) + b"include nav")
    assert reply == b"<nav>from the environment's folder</nav>"
    pid = service.stats()["module_stats"]["pug"]["node_pid"]
    assert str(env_folder) in fs_reads(pid) and str(added) not in fs_reads(pid)
    # A module saved with a new folder in INCLUDE_DIRS: the running process may not read
    # it, so it is replaced by one that may.
    module = modules_dir / "jade.py"
    module.write_text(module.read_text().replace("= []", f"= [{str(added)!r}]"))
    service.wait_for_log("module jade reloaded")
    reply = service.call(b"jade:" + opts(include=str(added)) + b"include nav")
    assert reply == b"<nav>from a folder added later</nav>"
    service.wait_for_log(f"compiler process {pid} may not read the include folder {added}")
    pid = service.stats()["module_stats"]["jade"]["node_pid"]
    assert {str(env_folder), str(added)} <= fs_reads(pid)


def test_a_node_without_permission_model_compiles_with_a_warning(
    make_service, tmp_path: Path, monkeypatch
) -> None:
    # node 18 (Debian 12's, Ubuntu 24.04's) has no permission model: it still compiles.
    need_compilers()
    old = tmp_path / "oldnode"
    old.mkdir()
    (old / "node").write_text(
        '#!/bin/sh\ncase "$*" in *-permission*) echo "node: bad option: $1" >&2; exit 9;; esac\n'
        f'exec {shutil.which("node")} "$@"\n'
    )
    (old / "node").chmod(0o755)
    monkeypatch.setenv("PATH", f"{old}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("BGSERVICE_COMPILER_MAX_RSS", "1")  # MiB: each compile a new process
    service = make_service(root=tmp_path / "svc")
    assert service.call(b"pug:p= 1 + 1") == b"<p>2</p>"
    assert service.call(b"less:.a { b: c }") == b".a {\n  b: c;\n}\n"
    assert service.stats()["module_stats"]["pug"]["node_starts"] == 2
    warnings = [line for line in service.log().splitlines() if "no permission model" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], warnings
    assert "a pug or jade template can run programs" in warnings[0]
    started = [line for line in service.log().splitlines() if "compiler process started" in line]
    assert len(started) == 2 and all(line.endswith(", unconfined)") for line in started), started


# --- markdown ------------------------------------------------------------------------------


def test_markdown_tables_and_fenced_code(svc: ServiceProcess) -> None:
    pytest.importorskip("markdown_it", reason="pip install markdown-it-py mdit-py-plugins")
    text = "# Title\n\n| a | b |\n|:--|--:|\n| 1 | ~~2~~ |\n\n```python\nprint('<x>')\n```\n"
    assert compile_ok(svc, "markdown", text) == (
        "<h1>Title</h1>\n<table>\n<thead>\n<tr>\n"
        '<th style="text-align:left">a</th>\n<th style="text-align:right">b</th>\n'
        "</tr>\n</thead>\n<tbody>\n<tr>\n"
        '<td style="text-align:left">1</td>\n<td style="text-align:right"><s>2</s></td>\n'
        "</tr>\n</tbody>\n</table>\n"
        "<pre><code class=\"language-python\">print('&lt;x&gt;')\n</code></pre>\n"
    )
    assert (
        compile_ok(svc, "markdown", "<b>x</b>", opts(html="0")) == "<p>&lt;b&gt;x&lt;/b&gt;</p>\n"
    )
    assert compile_ok(svc, "markdown", "?:? is a question") == "<p>? is a question</p>\n"


def test_markdown_flags_refuse_what_they_do_not_know(svc: ServiceProcess) -> None:
    pytest.importorskip("markdown_it", reason="pip install markdown-it-py mdit-py-plugins")
    for word in ("Off", "no", "false"):
        assert compile_ok(svc, "markdown", "<b>x</b>", opts(html=word)).startswith("<p>&lt;b")
    assert compile_ok(svc, "markdown", "<b>x</b>", opts(html="YES")) == "<p><b>x</b></p>\n"
    # Each of these let raw HTML through (read as on) where the client meant it off.
    for word in ("maybe", "n", "0 ", ""):
        reply = compile_error(svc, "markdown", "<b>x</b>", opts(html=word))
        assert reply == f"400: html: expected 1/true/yes/on or 0/false/no/off, not {word!r}"
    assert compile_error(svc, "markdown", "a", opts(breaks="2")).startswith("400: breaks: ")


def test_compiler_flags_refuse_what_they_do_not_know(svc: ServiceProcess) -> None:
    # minify=n (or maybe, nein...) minified; bare=, pretty= the same: node read any word
    # but 0/false/no/off as on. The words markdown's flags take, each way, and no other.
    expanded = compile_ok(svc, "scss", SCSS)
    for word in ("Off", "no", "0", "FALSE"):
        assert compile_ok(svc, "scss", SCSS, opts(minify=word)) == expanded
    assert compile_ok(svc, "scss", SCSS, opts(minify="on")) == compile_ok(
        svc, "scss", SCSS, opts(minify="1")
    )
    for module, name in (("scss", "minify"), ("less", "minify"), ("coffee", "bare"),
                         ("pug", "pretty"), ("minify?type=js&", "mangle")):  # fmt: skip
        module, _, more = module.partition("?")
        for word in ("n", "maybe", ""):
            options = b"?" + more.encode() + opts(**{name: word})[1:]
            reply = compile_error(svc, module, "a", options)
            assert reply == f"400: {name}: expected 1/true/yes/on or 0/false/no/off, not {word!r}"


# --- minify --------------------------------------------------------------------------------


def test_minify_js(svc: ServiceProcess, tmp_path: Path) -> None:
    source = (
        "function add(first, second) {\n  // sum\n  return first + second;\n}\n"
        "console.log(add(2, 3));\n"
    )
    out = compile_ok(svc, "minify", source)
    assert out == "function add(d,n){return d+n}console.log(add(2,3));"
    assert run_js(tmp_path, out) == "5\n"


def test_minify_css(svc: ServiceProcess) -> None:
    source = ".a {\n  color: #ff0000;\n  margin: 0px 0px 0px 0px;\n}\n.b { color: red; }\n"
    assert (
        compile_ok(svc, "minify", source, opts(type="css")) == ".a{color:red;margin:0}.b{color:red}"
    )


def test_minify_syntax_errors(svc: ServiceProcess) -> None:
    assert compile_error(svc, "minify", "let a = 1;\nfunction (").startswith("400: input.js:2:")
    reply = compile_error(svc, "minify", ".a { color: red; }\n.b {{ \n", opts(type="css"))
    assert reply == "400: input.css:2:5: Unexpected end of input"


# --- options, errors and the node process --------------------------------------------------


def test_bad_options(svc: ServiceProcess) -> None:
    assert compile_error(svc, "scss", ".a{}", b"?nope=1:").startswith("400: unknown option 'nope'")
    assert compile_error(svc, "scss", "?filename=x").startswith("400: options:")
    assert compile_error(svc, "scss", ".a{}", opts(sources="[")).startswith("400: sources:")


def test_template_output_does_not_disturb_the_protocol(svc: ServiceProcess) -> None:
    assert compile_ok(svc, "pug", "- console.log('{\"id\": 1}')\np ok") == "<p>ok</p>"
    svc.wait_for_log('node: {"id": 1}')


def test_node_dies_and_comes_back(svc: ServiceProcess) -> None:
    assert compile_ok(svc, "scss", ".a { b: c }") == ".a {\n  b: c;\n}"  # node runs
    pid = svc.stats()["module_stats"]["scss"]["node_pid"]
    assert pid
    # A process that dies (a crash, the OOM killer) fails the compiles in it with a 5xx.
    replies: list[bytes] = []
    stuck = b"pug:- while (true) {}"
    call = threading.Thread(target=lambda: replies.append(svc.call(stuck, timeout=30)))
    call.start()
    wait_until(lambda: svc.stats()["module_stats"]["pug"]["in_flight"])
    for node in svc.stats()["module_stats"]["pug"]["node_pids"]:
        os.kill(node, signal.SIGKILL)
    call.join(30)
    assert replies[0].startswith(b"503: the compiler process died (exit code -9)"), replies
    assert compile_ok(svc, "scss", ".a { b: c }") == ".a {\n  b: c;\n}"
    stats = wait_until(lambda: svc.stats()["module_stats"]["scss"])
    assert stats["node_pid"] not in (None, pid)


def test_ctrl_c_lets_a_compile_in_flight_finish(tmp_path: Path) -> None:
    # A terminal's Ctrl-C signals its whole process group: node, in the service's, died at
    # once, and the compile in flight got "503: the compiler process died (exit code -2)"
    # (a queued compile job failed for good) instead of its shutdown_grace.
    need_compilers()
    svc = ServiceProcess(tmp_path)
    svc.signals = {signal.SIGINT: signal.SIG_DFL}
    svc.own_group = True
    svc.start()
    try:
        assert compile_ok(svc, "pug", "p warm") == "<p>warm</p>"  # node runs
        pid = svc.stats()["module_stats"]["pug"]["node_pid"]
        slow = b"pug:- const end = Date.now() + 1500; while (Date.now() < end) {}\np done"
        replies: list[bytes] = []
        call = threading.Thread(target=lambda: replies.append(svc.call(slow, timeout=30)))
        call.start()
        wait_until(lambda: svc.stats()["module_stats"]["pug"]["in_flight"])
        os.killpg(svc.proc.pid, signal.SIGINT)  # (svc.proc: set by start)
        call.join(30)
        assert replies == [b"<p>done</p>"], svc.log()
        assert svc.wait() == 0
        assert "exited with code" not in svc.log()
        assert f"compiler process {pid} stopped" in svc.log()
    finally:
        svc.stop()


def test_compilers_or_node_not_installed(make_service, tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "nocompilers"
    empty.mkdir()
    (empty / "server.js").write_text("")
    monkeypatch.setenv("BGSERVICE_COMPILERS", str(empty))
    service = make_service()
    reply = service.call(b"scss:.a{}").decode()
    assert reply == f"503: compilers not installed: install with: npm ci --prefix {empty}"
    assert service.call(b"minify:?type=css:.a{}").startswith(b"503: compilers not installed")
    service.stop()
    monkeypatch.delenv("BGSERVICE_COMPILERS")
    monkeypatch.setenv("PATH", str(empty))
    service = make_service(root=tmp_path)
    assert service.call(b"less:.a{}").decode().startswith("503: node is not installed")


def test_many_compiles_in_flight_on_one_connection(svc: ServiceProcess) -> None:
    conn = svc.framed()
    try:
        conn.send(*[b"scss:.a%d { b: %d }" % (n, n) for n in range(40)])
        replies = [conn.recv() for _ in range(40)]
    finally:
        conn.close()
    assert replies == [(200, b".a%d {\n  b: %d;\n}" % (n, n)) for n in range(40)]


def test_stuck_compile_times_out_and_node_is_replaced(make_service, monkeypatch) -> None:
    monkeypatch.setenv("BGSERVICE_COMPILE_TIMEOUT", "1")
    service = make_service()
    assert service.call(b"coffee:x = 1").startswith(b"(function")
    pid = service.stats()["module_stats"]["coffee"]["node_pid"]
    reply = service.call(b"pug:- while (true) {}").decode()
    assert reply == "504: pug: compile took over 1 s"
    assert service.call(b"coffee:x = 1").startswith(b"(function")
    assert service.stats()["module_stats"]["coffee"]["node_pid"] not in (pid, None)


def test_a_stuck_compile_delays_and_kills_only_its_own_node_process(
    make_service, monkeypatch
) -> None:
    monkeypatch.setenv("BGSERVICE_COMPILE_TIMEOUT", "3")
    service = make_service()
    assert service.call(b"coffee:x = 1").startswith(b"(function")  # one process, idle
    stuck: list[bytes] = []
    thread = threading.Thread(target=lambda: stuck.append(service.call(b"pug:- while (true) {}")))
    thread.start()
    try:
        wait_until(lambda: service.stats()["module_stats"]["pug"]["in_flight"] == 1)
        # Sent while the loop runs: to a second process, answered, not killed with the first.
        assert service.call(b"coffee:y = 2").startswith(b"(function")
        stats = service.stats()["module_stats"]["coffee"]
        assert len(stats["node_pids"]) == 2 and stats["node_starts"] == 2
    finally:
        thread.join(10)
    assert stuck == [b"504: pug: compile took over 3 s"]
    assert service.call(b"coffee:z = 3").startswith(b"(function")


def test_a_finished_compile_replies_while_the_next_one_runs(make_service, monkeypatch) -> None:
    # node compiled every request of one read before it sent any reply: one queued behind
    # a stuck compile lost its finished output to the kill (a 503 instead of its CSS).
    monkeypatch.setenv("BGSERVICE_COMPILER_PROCESSES", "1")
    monkeypatch.setenv("BGSERVICE_COMPILE_TIMEOUT", "2")
    service = make_service()
    assert service.call(b"jade:p ok") == b"<p>ok</p>"  # node started, Pug loaded
    assert service.call(b"scss:.a { b: c }") == b".a {\n  b: c;\n}"  # and Sass
    conn = service.framed()
    try:
        # While the first one runs, the other two arrive: node reads them at once.
        busy = b"pug:- const t = Date.now(); while (Date.now() - t < 1000) {}\np busy"
        conn.send(busy, b"scss:.queued { b: c }", b"pug:- while (true) {}")
        replies = sorted(conn.recv() for _ in range(3))
    finally:
        conn.close()
    assert replies == [
        (200, b".queued {\n  b: c;\n}"),
        (200, b"<p>busy</p>"),
        (504, b"pug: compile took over 2 s"),
    ]
    stats = service.stats()["module_stats"]
    # jade and pug counted apart; a 504 is an error too
    assert (stats["jade"]["compiles"], stats["jade"]["errors"]) == (1, 0)
    assert (stats["pug"]["compiles"], stats["pug"]["errors"]) == (2, 1)


def test_a_compile_whose_call_gave_up_still_ends_at_its_timeout(make_service, monkeypatch) -> None:
    # A job's timeout= (or call_timeout) shorter than the compile's: node was left in the
    # endless loop, never killed, and looked idle, so the next compile went to it and waited.
    monkeypatch.setenv("BGSERVICE_COMPILE_TIMEOUT", "2")
    service = make_service()
    assert service.call(b"coffee:x = 1").startswith(b"(function")
    reply = service.call(b"queue:add?wait=1&timeout=0.5:pug:- while (true) {}")
    assert reply == b"504: Module pug timed out after 0.5 s"
    stats = service.stats()["module_stats"]
    assert (stats["pug"]["in_flight"], stats["coffee"]["in_flight"]) == (1, 0)  # still in node
    assert service.call(b"coffee:y = 2").startswith(b"(function")  # in another process
    service.wait_for_log("pug compile still running after 2 s: killing node")
    assert wait_until(lambda: service.stats()["module_stats"]["pug"]["in_flight"] == 0)
    assert service.call(b"coffee:z = 3").startswith(b"(function")


def test_a_node_that_exits_at_once_is_a_503(make_service, tmp_path: Path, monkeypatch) -> None:
    # A broken or too old node: replies were sometimes a 500 RuntimeError (a closed pipe).
    fake = tmp_path / "fakenode"
    fake.mkdir()
    (fake / "node").write_text('#!/bin/sh\necho "fake node: unsupported" >&2\nexit 9\n')
    (fake / "node").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    service = make_service(root=tmp_path / "svc")
    conn = service.framed()
    replies = []
    try:
        for _ in range(5):  # (a race: about one batch in two met the closed pipe)
            conn.send(*[b"scss:.a%d { b: c }" % n for n in range(20)])
            replies += [conn.recv() for _ in range(20)]
    finally:
        conn.close()
    for status, body in replies:
        assert status == 503 and b"the compiler process died" in body, (status, body)
    assert "Traceback" not in service.log()


def test_output_limit_and_resident_memory_bound(make_service, monkeypatch) -> None:
    monkeypatch.setenv("BGSERVICE_COMPILE_MAX_OUTPUT", "100000")
    monkeypatch.setenv("BGSERVICE_COMPILER_MAX_RSS", "1")  # MiB: every process is over it
    service = make_service()
    # Was a 503 "process died" past a fixed 256 MiB, and killed every compile with it.
    reply = service.call(b"pug:p= 'x'.repeat(200000)").decode()
    assert reply == (
        "413: pug: output of 200007 bytes is over the limit of 100000"
        " (BGSERVICE_COMPILE_MAX_OUTPUT)"
    )
    assert service.call(b"pug:p= 'x'.repeat(99993)") == b"<p>" + b"x" * 99993 + b"</p>"
    # After each compile its process was over the bound: it exited (0) and was replaced.
    service.wait_for_log("MiB resident (BGSERVICE_COMPILER_MAX_RSS is 1): replacing it")
    assert service.stats()["module_stats"]["pug"]["node_starts"] == 2
    assert "exited with code" not in service.log()


def test_bad_settings_are_named_and_markdown_goes_on(make_service, monkeypatch) -> None:
    monkeypatch.setenv("BGSERVICE_COMPILE_TIMEOUT", "0")  # was taken: every compile a 504
    monkeypatch.setenv("BGSERVICE_COMPILER_PROCESSES", "two")  # was a bare ValueError
    service = make_service()
    reply = service.call(b"scss:.a { b: c }").decode()
    assert reply.startswith("502: Module scss failed to load"), reply
    assert "BGSERVICE_COMPILE_TIMEOUT='0': must be a number, 0.001-86400" in reply
    assert "BGSERVICE_COMPILER_PROCESSES='two': must be a whole number, 1-64" in reply
    if importlib.util.find_spec("markdown_it") is not None:
        assert service.call(b"markdown:# hi") == b"<h1>hi</h1>\n"


def test_node_follows_the_modules_lifecycle(make_service, modules_dir: Path) -> None:
    service = make_service()
    assert service.call(b"less:.a { b: c }") == b".a {\n  b: c;\n}\n"
    pid = service.stats()["module_stats"]["less"]["node_pid"]
    # A reload of one module keeps the process the others share.
    less = modules_dir / "less.py"
    less.write_text(less.read_text() + "\n# edited\n")
    service.wait_for_log("module less reloaded")
    assert service.call(b"less:.a { b: c }") == b".a {\n  b: c;\n}\n"
    assert service.stats()["module_stats"]["less"]["node_pid"] == pid
    # The unload hooks stop it when the service stops.
    assert service.stop() == 0
    assert f"compiler process {pid} stopped" in service.log()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


COMPILE_MODULES = ("less", "scss", "sass", "pug", "jade", "typescript", "coffee", "minify")
# A compile module whose import fails after its Compiler was made: it is never unloaded.
FAILS_LATE = '''
from . import _node

compiler = _node.Compiler("less", {"filename"})
raise RuntimeError("broken below the Compiler")
'''


def test_node_stops_with_the_last_compile_module_despite_failed_imports(
    make_service, modules_dir: Path
) -> None:
    # Found by review: a module whose import failed after its Compiler was made (a new
    # one, or a bad save of a loaded one) kept its user counted for ever, so node outlived
    # the last compile module until the service stopped.
    need_compilers()
    (modules_dir / "styles.py").write_text(FAILS_LATE)
    service = make_service()
    assert "module styles failed to load" in service.log()
    assert service.call(b"less:.a { b: c }") == b".a {\n  b: c;\n}\n"
    pid = service.stats()["module_stats"]["less"]["node_pid"]
    less = modules_dir / "less.py"
    less.write_text(less.read_text() + 'raise RuntimeError("a bad save")\n')
    service.wait_for_log("module less failed to load")
    assert service.call(b"less:.a { b: c }") == b".a {\n  b: c;\n}\n"  # the last good one
    for name in COMPILE_MODULES:
        (modules_dir / f"{name}.py").unlink()
    service.wait_for_log(f"compiler process {pid} stopped")
    wait_until(lambda: _gone(pid))
    assert service.call(b"echo:still up") == b"still up"


def test_large_source(svc: ServiceProcess) -> None:
    """Over 256 KB each way: the JSON to and from node is coded off the event loop."""
    source = "".join(f".a{n}{{b:{n}px}}" for n in range(30_000))
    assert len(source) > 1 << 18
    assert compile_ok(svc, "scss", source, opts(minify="1")) == source


def _gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie nobody reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_node_ends_with_a_killed_service_even_in_a_stuck_compile(make_service, monkeypatch) -> None:
    # A service killed with -9 (or by the OOM killer) left its node processes behind: one
    # in a compile's endless loop spun a core until someone noticed.
    monkeypatch.setenv("BGSERVICE_COMPILE_TIMEOUT", "60")
    service = make_service()
    assert service.call(b"coffee:x = 1").startswith(b"(function")
    thread = threading.Thread(target=service.call, args=(b"pug:- while (true) {}",))
    thread.start()
    wait_until(lambda: service.stats()["module_stats"]["pug"]["in_flight"] == 1)
    pids = service.stats()["module_stats"]["coffee"]["node_pids"]
    assert pids and not any(map(_gone, pids))
    service.proc.kill()
    service.proc.wait()
    thread.join(15)
    wait_until(lambda: all(map(_gone, pids)), timeout=10)
