#!/usr/bin/env node
// The asset compilers of bgservice's shipped modules, loaded once and kept alive.
//
// Protocol (modules/_node.py is the client): one JSON object per line on stdin,
//   {"id": 1, "lang": "scss", "source": "...", "options": {...}}
// and one per line on stdout (many may be sent at once; they are compiled one at a time, in
// the order they came, each reply written before the next compile starts, so a slow
// compile delays only the ones behind it):
//   {"id": 1, "ok": true, "size": 12, "rss": 123456789}   followed by the output: 12 bytes
//   {"id": 1, "ok": false, "status": 400, "error": "input.scss:3:5: expected \";\".", "rss": ...}
// The output travels as it is, UTF-8, after its line: JSON of megabytes would cost the
// service a parse holding Python's GIL (its event loop stalled for it, thread or not).
// Compile errors are 400 with file:line:column; a compiler package that is not installed
// is 503 naming the install command; an output longer than the request's max_output
// (UTF-8 bytes) is 413. rss is the process's resident memory after the compile (bytes).
// The process exits when stdin closes (after the compiles already sent), so it never
// outlives the service. Diagnostics go to stderr, which the client logs.
//
// Files: a compile can only read what the request passes in options.sources (Sass, LESS)
// or files inside options.root, a folder the Python side already checked against the
// module's allow list; every path is resolved here again and refused outside that root.
// Less's @plugin (which would run JavaScript) and image-size() & co. (which read the disk)
// are refused. A compiler's stack overflow on deep nesting is a 400, not a 500.
//
// Confinement: modules/_node.py starts this process under node's permission model, which
// lets it read this file, node_modules and the include folders, and nothing else, and
// neither write a file nor start a program or a worker, whatever a compile does. A Pug
// template, which is JavaScript, also runs in a V8 context of its own where process,
// require and global are not in reach (see compilePug): a second fence behind the first.
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');
const vm = require('vm');

// --allow-addons, which Lightning CSS (a native addon) needs, lets process.dlopen load any
// shared library, which node does not check against --allow-fs-read: one that anybody wrote
// to /tmp would run as the service. Only the compilers' own addons may load (by their real
// path, so a symlink swapped in between cannot change what is loaded).
const dlopen = process.dlopen;
Object.defineProperty(process, 'dlopen', {
  value: function dlopenOwnAddonsOnly(module, filename, ...rest) {
    const real = fs.realpathSync(filename);
    const own = fs.realpathSync(path.join(__dirname, 'node_modules')) + path.sep;
    if (!real.startsWith(own)) {
      throw new Error(`${filename}: only the compilers' own native addons may be loaded`);
    }
    return dlopen.call(process, module, real, ...rest);
  },
  enumerable: true,
  writable: false,
  configurable: false,
});

const INSTALL = `install with: npm ci --prefix ${__dirname}`;
const loaded = {};

class CompileError extends Error {
  constructor(message, status = 400) {
    super(message);
    this.status = status;
  }
}

function need(name) {
  if (!(name in loaded)) {
    try {
      loaded[name] = require(name);
    } catch (err) {
      if (err.code === 'MODULE_NOT_FOUND') {
        throw new CompileError(`${name} is not installed: ${INSTALL}`, 503);
      }
      throw err;
    }
  }
  return loaded[name];
}

function flag(value, byDefault) {
  if (value === undefined || value === '') return byDefault;
  return !['0', 'false', 'no', 'off'].includes(String(value).toLowerCase());
}

// --- files: in-memory sources first, then the allowed root --------------------------------

// A virtual file system: "/name" paths; options.sources maps names to text; a path that is
// not there is read from options.root, never from outside it.
class Files {
  constructor(options) {
    this.sources = new Map();
    for (const [name, text] of Object.entries(options.sources || {})) {
      this.sources.set(path.posix.resolve('/', name), String(text));
    }
    this.root = options.root ? fs.realpathSync(options.root) : null;
  }

  // The text of virtual path p, or undefined if there is no such file.
  read(p) {
    if (this.sources.has(p)) return this.sources.get(p);
    if (!this.root) return undefined;
    const full = path.join(this.root, p);
    let real;
    try {
      real = fs.realpathSync(full);
    } catch {
      return undefined;
    }
    if (real !== this.root && !real.startsWith(this.root + path.sep)) {
      // Kept: a compiler that wraps errors in its own (Less) still replies this 403.
      this.refused = new CompileError(`${p}: outside the include folder`, 403);
      throw this.refused;
    }
    return fs.statSync(real).isFile() ? fs.readFileSync(real, 'utf8') : undefined;
  }

  // The first candidate that exists, as [virtual path, text], or null.
  find(candidates) {
    for (const p of candidates) {
      const text = this.read(p);
      if (text !== undefined) return [p, text];
    }
    return null;
  }
}

// --- Sass (Dart Sass, the reference implementation) ---------------------------------------

function sassCandidates(p) {
  const dir = path.posix.dirname(p);
  const base = path.posix.basename(p);
  if (/\.(scss|sass|css)$/.test(base)) return [p, path.posix.join(dir, `_${base}`)];
  const out = [];
  for (const stem of [p, `${p}/index`]) {
    const d = path.posix.dirname(stem);
    const b = path.posix.basename(stem);
    for (const ext of ['scss', 'sass', 'css']) {
      out.push(`${d === '/' ? '' : d}/${b}.${ext}`, `${d === '/' ? '' : d}/_${b}.${ext}`);
    }
  }
  return out;
}

function sassImporter(files) {
  return {
    canonicalize(url, context) {
      let p;
      if (url.startsWith('mem:')) {
        p = decodeURIComponent(new URL(url).pathname);
      } else if (/^[a-z][a-z0-9+.-]*:/i.test(url)) {
        return null;
      } else {
        const base = context.containingUrl ? decodeURIComponent(context.containingUrl.pathname) : '/';
        p = path.posix.resolve(path.posix.dirname(base), url);
      }
      const hit = files.find(sassCandidates(p));
      return hit ? new URL(`mem:${encodeURI(hit[0])}`) : null;
    },
    load(canonical) {
      const p = decodeURIComponent(canonical.pathname);
      const text = files.read(p);
      if (text === undefined) return null;
      const syntax = p.endsWith('.sass') ? 'indented' : p.endsWith('.css') ? 'css' : 'scss';
      return { contents: text, syntax };
    },
  };
}

function compileSass(source, options, indented) {
  const sass = need('sass');
  const files = new Files(options);
  const name = path.posix.basename(options.filename || (indented ? 'input.sass' : 'input.scss'));
  const importer = sassImporter(files);
  try {
    const result = sass.compileString(source, {
      syntax: indented ? 'indented' : 'scss',
      style: flag(options.minify, false) ? 'compressed' : 'expanded',
      url: new URL(`mem:/${encodeURI(name)}`),
      importer,
      importers: [importer],
      logger: sass.Logger.silent,
      // No @charset, no BOM (which compressed output started with): the output is UTF-8
      // anyway, and a BOM in the middle of a page (CSS inlined in <style>) broke its first rule.
      charset: false,
    });
    return result.css;
  } catch (err) {
    // Sass reports an importer's error as its own (a 400): a read refused is a 403.
    if (files.refused) throw files.refused;
    if (err instanceof sass.Exception) {
      const span = err.span;
      const where = span && span.url ? decodeURIComponent(span.url.pathname).replace(/^\//, '') : name;
      const line = span ? span.start.line + 1 : 0;
      const col = span ? span.start.column + 1 : 0;
      throw new CompileError(`${where}:${line}:${col}: ${err.sassMessage}`);
    }
    throw err;
  }
}

// --- LESS ---------------------------------------------------------------------------------

function lessSandbox(less, files) {
  // Replaces Less's file managers for this render: imports and data-uri() are served from
  // the request's sources and the allowed root only.
  class Sandbox extends less.FileManager {
    supports() {
      return true;
    }
    supportsSync() {
      return true;
    }
    resolve(filename, currentDirectory) {
      const dir = currentDirectory ? path.posix.resolve('/', currentDirectory) : '/';
      const p = path.posix.resolve(dir, filename);
      const candidates = path.posix.extname(p) ? [p] : [p, `${p}.less`];
      return files.find(candidates);
    }
    loadFileSync(filename, currentDirectory) {
      const hit = this.resolve(filename, currentDirectory);
      if (!hit) return { error: { type: 'File', message: `'${filename}' wasn't found` } };
      return { contents: hit[1], filename: hit[0] };
    }
    loadFile(filename, currentDirectory) {
      // Less never settles a render whose loadFile throws: errors go back as a rejection.
      try {
        const result = this.loadFileSync(filename, currentDirectory);
        return result.error ? Promise.reject(result.error) : Promise.resolve(result);
      } catch (err) {
        return Promise.reject(err);
      }
    }
  }
  return {
    install(_less, pluginManager) {
      pluginManager.addFileManager(new Sandbox());
    },
  };
}

function lessMessage(err, name) {
  const file = err.filename && err.filename !== 'input' ? String(err.filename).replace(/^\//, '') : name;
  const where = err.line ? `${file}:${err.line}:${(err.column || 0) + 1}` : file;
  if (err.message === undefined) {
    // Less copies a JavaScript error of its own (its stack exceeded by a deep mixin
    // recursion, or by one that doubles its output at each level) without the message.
    return `${where}: Error: the compiler failed without a message (most often its stack ran ` +
      'out: a mixin recursion too deep, or one that multiplies its output at each level)';
  }
  return `${where}: ${err.type || 'Syntax'}Error: ${err.message}`;
}

async function compileLess(source, options) {
  const less = need('less');
  if (!less.__bgserviceNoPlugins) {
    // @plugin would load and run JavaScript: refuse it.
    less.PluginLoader.prototype.loadPlugin = () =>
      Promise.reject({ type: 'Plugin', message: '@plugin is not allowed' });
    // image-size(), image-width(), image-height() read the named path from the real disk
    // (whatever the file manager answers): refuse them.
    for (const fn of ['image-size', 'image-width', 'image-height']) {
      less.functions.functionRegistry.add(fn, () => {
        throw { type: 'File', message: `${fn}() is not allowed: it would read a file from disk` };
      });
    }
    less.__bgserviceNoPlugins = true;
  }
  const files = new Files(options);
  const name = path.posix.basename(options.filename || 'input.less');
  let css;
  try {
    const out = await less.render(source, {
      filename: `/${name}`,
      plugins: [lessSandbox(less, files)],
      javascriptEnabled: false,
      math: 'parens-division',
    });
    css = out.css;
  } catch (err) {
    if (err instanceof CompileError) throw err;
    if (files.refused) throw files.refused;
    if (err && (err.line || err.type)) throw new CompileError(lessMessage(err, name));
    throw err;
  }
  return flag(options.minify, false) ? minifyCss(css, options, name) : css;
}

// --- TypeScript, CoffeeScript -------------------------------------------------------------

const TS_JSX = new Set(['preserve', 'react', 'react-native', 'react-jsx', 'react-jsxdev']);
// The targets and module kinds transpileModule can emit (not ts.ScriptTarget.JSON, which
// fails with "Debug Failure", nor ES3, removed in TypeScript 5), by lower-case name.
const TS_YEARS = Array.from({ length: 10 }, (_, i) => `es${2015 + i}`); // es2015 ... es2024
const TS_TARGETS = ['es5', 'es6', ...TS_YEARS, 'esnext'];
const TS_MODULES = {
  cjs: 'CommonJS', commonjs: 'CommonJS', esm: 'ESNext', es6: 'ES2015', es2015: 'ES2015',
  es2020: 'ES2020', es2022: 'ES2022', esnext: 'ESNext', amd: 'AMD', umd: 'UMD', system: 'System',
};

function tsChoice(kinds, value, what, names) {
  const key = String(value).toLowerCase();
  const found = kinds[names[key] || Object.keys(kinds).find((k) => k.toLowerCase() === key)];
  if (!Object.hasOwn(names, key) || found === undefined) {
    throw new CompileError(`unknown ${what} ${value} (${Object.keys(names).join(', ')})`);
  }
  return found;
}

function compileTypeScript(source, options) {
  const ts = need('typescript');
  const jsx = options.jsx || '';
  const tsx = jsx !== '' || /\.[jt]sx$/.test(options.filename || '');
  const name = path.posix.basename(options.filename || (tsx ? 'input.tsx' : 'input.ts'));
  const targets = Object.fromEntries(TS_TARGETS.map((t) => [t, t === 'es6' ? 'ES2015' : null]));
  const target = tsChoice(ts.ScriptTarget, options.target || 'es2020', 'target', targets);
  const module = tsChoice(ts.ModuleKind, options.module || 'cjs', 'module', TS_MODULES);
  if (jsx && !TS_JSX.has(jsx)) throw new CompileError(`unknown jsx mode ${jsx}`);
  const compilerOptions = {
    target,
    module,
    removeComments: flag(options.minify, false),
    sourceMap: false,
  };
  if (tsx) compilerOptions.jsx = jsx || 'react';
  const result = ts.transpileModule(source, {
    fileName: tsx && !name.endsWith('.tsx') ? `${name.replace(/\.[jt]sx?$/, '')}.tsx` : name,
    reportDiagnostics: true,
    compilerOptions,
  });
  const errors = (result.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (errors.length) {
    const lines = errors.slice(0, 10).map((d) => {
      const text = ts.flattenDiagnosticMessageText(d.messageText, '\n');
      if (!d.file || d.start === undefined) return `${name}: error TS${d.code}: ${text}`;
      const pos = d.file.getLineAndCharacterOfPosition(d.start);
      return `${name}:${pos.line + 1}:${pos.character + 1}: error TS${d.code}: ${text}`;
    });
    throw new CompileError(lines.join('\n'));
  }
  return result.outputText;
}

// CoffeeScript's lexer and rewriter take time growing with the cube of the nesting (10,000
// brackets: 12 s, before its parser overflows its stack anyway): deeper input is refused
// first. Depth counts ( [ { outside strings and comments, plus indentation levels.
const COFFEE_MAX_DEPTH = 1000;

function coffeeDepthCheck(source) {
  const indents = [0];
  let brackets = 0;
  let lineStart = true;
  for (let i = 0; i < source.length; i++) {
    if (lineStart) {
      let width = 0;
      while (source[i] === ' ' || source[i] === '\t') {
        width++;
        i++;
      }
      lineStart = false;
      if (source[i] !== '\n' && source[i] !== '\r' && i < source.length) {
        while (width < indents[indents.length - 1]) indents.pop();
        if (width > indents[indents.length - 1]) indents.push(width);
      }
    }
    const c = source[i];
    const triple = '#\'"/'.includes(c) ? source.substr(i, 3) : '';
    if (c === '\\') {
      i++;
    } else if (triple === '###' || triple === "'''" || triple === '"""' || triple === '///') {
      const end = source.indexOf(triple, i + 3);
      i = end < 0 ? source.length : end + 2;
    } else if (c === '#') {
      const end = source.indexOf('\n', i);
      i = end < 0 ? source.length : end - 1;
    } else if (c === '"' || c === "'" || c === '`') {
      for (i++; i < source.length && source[i] !== c; i++) {
        if (source[i] === '\\') i++;
      }
    } else if (c === '(' || c === '[' || c === '{') {
      brackets++;
    } else if (c === ')' || c === ']' || c === '}') {
      brackets = Math.max(0, brackets - 1);
    } else if (c === '\n') {
      lineStart = true;
    }
    if (brackets + indents.length - 1 > COFFEE_MAX_DEPTH) {
      throw new CompileError(
        `coffee: input nested too deeply (more than ${COFFEE_MAX_DEPTH} levels, the limit)`
      );
    }
  }
}

function compileCoffee(source, options) {
  const coffee = need('coffeescript');
  const name = path.posix.basename(options.filename || 'input.coffee');
  coffeeDepthCheck(source);
  try {
    return coffee.compile(source, { bare: flag(options.bare, false), filename: name });
  } catch (err) {
    if (err instanceof SyntaxError && err.location) {
      const { first_line: line, first_column: col } = err.location;
      throw new CompileError(`${name}:${line + 1}:${col + 1}: error: ${err.message}`);
    }
    throw err;
  }
}

// --- Pug ----------------------------------------------------------------------------------

// A template is JavaScript. It runs in a V8 context of its own, made from nothing of this
// process's: its code and pug's runtime (inlined by compileClient) are evaluated there and
// its variables parsed from JSON there, so no object in its reach leads to process, require
// or global (a host object would: its constructor's constructor is this realm's Function).
// node's vm is no security boundary; the permission model is the fence, this a second one.
// A context costs about 200 KB, counted in the template cache.
const CONTEXT_SIZE = 256 * 1024;

// Runs in a template's context, evaluated there from its source text (so it closes over
// nothing of this file): a console whose lines go to write(), and in place of process,
// require, global and module stand-ins that fail any use with a clear message. Returns the
// template's entry: its variables come in as JSON text.
function templateGlobals(write) {
  'use strict';
  const toText = String;
  const parse = JSON.parse;
  const log = (...args) => {
    try {
      write(args.map((arg) => toText(arg)).join(' '));
    } catch {
      // Not even an error of this process's reaches the template.
    }
  };
  globalThis.console = { log, info: log, warn: log, error: log, debug: log };
  for (const name of ['process', 'require', 'global', 'module']) {
    const refuse = () => {
      const why = 'templates may not run programs or use files';
      throw new Error(`${name} is not available to a template (${why})`);
    };
    const traps = { get: refuse, set: refuse, has: refuse, apply: refuse, construct: refuse };
    Object.defineProperty(globalThis, name, { value: new Proxy(function () {}, traps) });
  }
  return (template) => (vars) => template(parse(vars));
}

// A template's console: the service logs this process's stderr. Never throws (see above).
function writeLine(text) {
  try {
    if (typeof text === 'string') process.stderr.write(`${text}\n`);
  } catch {
    // stderr gone: the service is stopping
  }
}

// compileClient's source -> the template's entry, in a new context. Object.create(null):
// a context made from a {} lets its code reach this realm through the {}'s prototype.
function templateEntry(client, filename) {
  const context = vm.createContext(Object.create(null));
  const entry = vm.runInContext(`(${templateGlobals})`, context)(writeLine);
  return entry(vm.runInContext(`${client}\ntemplate`, context, { filename }));
}

// A thrown value's message: a template may throw anything, a getter that throws included.
function describe(err) {
  try {
    return err && err.message ? String(err.message) : String(err);
  } catch {
    return 'the template threw a value that cannot be shown';
  }
}

function pugVars(options) {
  if (!options.vars) return '{}';
  let locals;
  try {
    locals = JSON.parse(options.vars);
  } catch (err) {
    throw new CompileError(`vars: not JSON: ${err.message}`);
  }
  if (locals === null || typeof locals !== 'object' || Array.isArray(locals)) {
    throw new CompileError('vars: must be a JSON object');
  }
  return options.vars; // parsed again in the template's context
}

function compilePug(source, options) {
  const pug = need('pug');
  const files = new Files(options);
  const name = path.posix.basename(options.filename || 'input.pug');
  const vars = pugVars(options);
  // include/extends resolve and read through the sandbox, never the real file system.
  const sandbox = {
    resolve(filename, source_) {
      const from = source_ ? path.posix.dirname(source_) : '/';
      const p = path.posix.resolve(filename.startsWith('/') ? '/' : from, filename.replace(/^\//, ''));
      return path.posix.extname(p) ? p : `${p}.pug`;
    },
    read(filename) {
      const text = files.read(filename);
      if (text === undefined) throw new CompileError(`${filename}: no such file to include`);
      return text;
    },
  };
  const settings = {
    filename: `/${name}`,
    basedir: '/',
    plugins: [sandbox],
    pretty: flag(options.pretty, false),
    doctype: options.doctype || undefined,
    // true, not the default: the template's own text then travels with it for runtime error
    // context, which pug would otherwise read from the disk at the filename.
    compileDebug: true,
    name: 'template',
  };
  const key = options.root ? null : cacheKey(source, { ...options, vars: null });
  let render = key && templates.get(key)?.value;
  try {
    if (!render) {
      render = templateEntry(pug.compileClient(source, settings), `/${name}`);
      if (key) templates.set(key, render, source.length * 4 + CONTEXT_SIZE);
    }
  } catch (err) {
    if (err instanceof CompileError) throw err;
    if (err && err.code && String(err.code).startsWith('PUG:')) {
      const where = `${(err.filename || name).replace(/^\//, '')}:${err.line || 0}:${err.column || 1}`;
      throw new CompileError(`${where}: ${err.code}: ${err.msg}`);
    }
    // Anything else compiling throws is about the template too (e.g. a code line that
    // does not parse), so it is the client's error, not the service's.
    const where = err && err.line ? `${name}:${err.line}` : name;
    throw new CompileError(`${where}: ${describe(err)}`);
  }
  try {
    return render(vars);
  } catch (err) {
    // A runtime error of the template's own code (pug templates are JavaScript).
    throw new CompileError(`${name}: ${describe(err)}`);
  }
}

// --- minify -------------------------------------------------------------------------------

async function minifyJs(source, options) {
  const terser = need('terser');
  const name = path.posix.basename(options.filename || 'input.js');
  try {
    const out = await terser.minify(
      { [name]: source },
      { compress: flag(options.compress, true), mangle: flag(options.mangle, true), sourceMap: false }
    );
    return out.code;
  } catch (err) {
    if (err && err.line !== undefined) {
      throw new CompileError(`${name}:${err.line}:${(err.col || 0) + 1}: ${err.message}`);
    }
    throw err;
  }
}

// Lightning CSS recurses natively on nesting and overflows the process's stack (a crash,
// not an error) somewhere past 3,000 nested rules or 1,500 nested @-rules: deeper input is
// refused. Depth counts { ( [ outside strings and comments; a block of an @-rule counts 2.
const CSS_MAX_DEPTH = 2000;

function cssDepthCheck(source, name) {
  const weights = [];
  let depth = 0;
  let atRule = false;
  for (let i = 0; i < source.length; i++) {
    const c = source[i];
    if (c === '\\') {
      i++;
    } else if (c === '/' && source[i + 1] === '*') {
      const end = source.indexOf('*/', i + 2);
      i = end < 0 ? source.length : end + 1;
    } else if (c === '"' || c === "'") {
      for (i++; i < source.length && source[i] !== c && source[i] !== '\n'; i++) {
        if (source[i] === '\\') i++;
      }
    } else if (c === '@') {
      atRule = true;
    } else if (c === '{' || c === '(' || c === '[') {
      const weight = c === '{' && atRule ? 2 : 1;
      if (c === '{') atRule = false;
      weights.push(weight);
      depth += weight;
      if (depth > CSS_MAX_DEPTH) {
        throw new CompileError(`${name}: nested more than ${CSS_MAX_DEPTH} levels deep (the limit)`);
      }
    } else if (c === '}' || c === ')' || c === ']') {
      if (c === '}') atRule = false;
      if (weights.length) depth -= weights.pop();
    } else if (c === ';') {
      atRule = false;
    }
  }
}

function minifyCss(source, options, name_) {
  const css = need('lightningcss');
  const name = name_ || path.posix.basename(options.filename || 'input.css');
  cssDepthCheck(source, name);
  try {
    const out = css.transform({ filename: name, code: Buffer.from(source), minify: true });
    return out.code.toString();
  } catch (err) {
    if (err && err.loc) {
      throw new CompileError(`${name}:${err.loc.line}:${err.loc.column}: ${err.message}`);
    }
    throw err;
  }
}

function minify(source, options) {
  const type = options.type || (/\.css$/.test(options.filename || '') ? 'css' : 'js');
  if (type === 'js') return minifyJs(source, options);
  if (type === 'css') return minifyCss(source, options);
  throw new CompileError(`minify: type must be js or css, not ${type}`);
}

// --- caches -------------------------------------------------------------------------------

// Least recently used, bounded by the total length of what it holds.
class Lru {
  constructor(budget) {
    this.budget = budget;
    this.used = 0;
    this.map = new Map();
  }
  get(key) {
    const hit = this.map.get(key);
    if (hit !== undefined) {
      this.map.delete(key);
      this.map.set(key, hit);
    }
    return hit;
  }
  set(key, value, size) {
    if (size > this.budget / 4) return;
    if (this.map.has(key)) this.used -= this.map.get(key).size;
    this.map.delete(key);
    this.map.set(key, { value, size });
    this.used += size;
    for (const [k, v] of this.map) {
      if (this.used <= this.budget) break;
      this.map.delete(k);
      this.used -= v.size;
    }
  }
}

// Compiled output by request: the same source compiled again (a web app asking for the
// same stylesheet on every deploy or page) costs a hash instead of 20-100 ms of compiling.
// Not used when files come from an include folder, which may change between requests.
const outputs = new Lru(64 * 1024 * 1024);
// Compiled Pug templates by source and options, each in its context: rendering with new
// variables is cheap, compiling is not (the generated code is parsed to scope the variables).
const templates = new Lru(64 * 1024 * 1024);
const crypto = require('crypto');

function cacheKey(...parts) {
  const hash = crypto.createHash('sha256');
  for (const part of parts) hash.update(typeof part === 'string' ? part : JSON.stringify(part)).update('\0');
  return hash.digest('hex');
}

async function compileCached(lang, source, options) {
  const compiler = COMPILERS[lang];
  if (!compiler) throw new CompileError(`unknown language ${lang}`, 500);
  if (options.root || lang === 'pug' || lang === 'ping') return compiler(source, options);
  const key = cacheKey(lang, options, source);
  const hit = outputs.get(key);
  if (hit !== undefined) return hit.value;
  const output = await compiler(source, options);
  outputs.set(key, output, source.length + output.length);
  return output;
}

// --- the server ---------------------------------------------------------------------------

const COMPILERS = {
  scss: (s, o) => compileSass(s, o, false),
  sass: (s, o) => compileSass(s, o, true),
  less: compileLess,
  typescript: compileTypeScript,
  coffee: compileCoffee,
  pug: compilePug,
  minify,
  ping: () => 'pong',
};

// stdout carries the replies only: anything a compiler or a template prints goes to stderr.
const out = process.stdout;
const util = require('util');
for (const name of ['log', 'info', 'debug', 'warn']) {
  console[name] = (...args) => process.stderr.write(`${util.format(...args)}\n`);
}

const MAX_ERROR = 1 << 20; // characters of an error message sent (a template's context...)
const TOO_LARGE = /^(Invalid (string|array|typed array) length|Array buffer allocation failed)/;

function send(reply, output) {
  if (reply.error && reply.error.length > MAX_ERROR) {
    reply.error = `${reply.error.slice(0, MAX_ERROR)} ...`;
  }
  out.write(`${JSON.stringify({ ...reply, rss: process.memoryUsage.rss() })}\n`);
  if (output) out.write(output);
}

async function serve(line) {
  let request;
  try {
    request = JSON.parse(line);
  } catch (err) {
    process.stderr.write(`bad request line: ${err.message}\n`);
    return;
  }
  const { id, lang, source, options } = request;
  try {
    const output = await compileCached(lang, String(source ?? ''), options || {});
    // UTF-8, a lone surrogate (a template's String.fromCharCode(0xd800)) as U+FFFD.
    const data = Buffer.from(String(output ?? ''), 'utf8');
    // Checked here, not in the service, which would have to read it all first.
    const limit = request.max_output ?? Infinity;
    if (data.length > limit) {
      const error = `${lang}: output of ${data.length} bytes is over the limit of ${limit}`;
      send({ id, ok: false, status: 413, error: `${error} (BGSERVICE_COMPILE_MAX_OUTPUT)` });
    } else {
      send({ id, ok: true, size: data.length }, data);
    }
  } catch (err) {
    if (err instanceof CompileError) {
      send({ id, ok: false, status: err.status, error: err.message });
    } else if (err instanceof RangeError && /call stack size/i.test(err.message)) {
      // The compilers recurse on nesting: a source nested too deeply is the client's error.
      send({ id, ok: false, status: 400, error: `${lang}: input nested too deeply (${err.message})` });
    } else if (err instanceof RangeError && TOO_LARGE.test(err.message)) {
      // A value larger than node can hold (a string doubled in a loop): the source's doing.
      const error = `${lang}: the source makes a value too large (${err.message})`;
      send({ id, ok: false, status: 400, error });
    } else {
      const message = err && err.message ? err.message : String(err);
      process.stderr.write(`${lang} #${id}: ${(err && err.stack) || message}\n`);
      send({ id, ok: false, status: 500, error: `${lang}: ${message}` });
    }
  }
}

// One compile at a time, in the order the lines came, each reply written before the next
// compile starts: readline hands over every line of a read at once, and serving them as
// they came ran every synchronous compiler of the read before any reply went out.
const lines = [];
let serving = false;
let closed = false;

async function drain() {
  serving = true;
  while (lines.length) {
    await serve(lines.shift());
    await new Promise((resolve) => setImmediate(resolve)); // lets the reply out, reads more
  }
  serving = false;
  if (closed) process.exit(0);
}

const input = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
input.on('line', (line) => {
  lines.push(line);
  if (!serving) drain();
});
// stdin closed (the service stops, or retires this process): the compiles already sent
// are finished first.
input.on('close', () => {
  closed = true;
  if (!serving) process.exit(0);
});
out.on('error', () => process.exit(0));
