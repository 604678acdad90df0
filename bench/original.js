// bench/original.js: the original BackgroundService's TCP behaviour, as a benchmark peer.
//
// Not the original's code (see /work/shared/ORIGIN.md): the few things that decide its
// speed for its own clients. The first `data` event is taken as the whole request (no
// framing: that is why it answered its PHP clients at once, and why a large request was
// cut), the reply is written at once and the connection ended. The request is trimmed,
// the module name cleaned as the original did. Modules: `test` -> `Test`, `echo` -> the
// data; the in-memory queue: `queue:add:MODULE:DATA` -> `id:N` (every job starts at
// once), `queue:get:id:N` (polls every millisecond until the job is done, as the
// original did), `queue:check:id:N` -> 0, 1 or 2. No npm dependencies.
//
//   node bench/original.js PORT      (0: any free port; prints the port it took)
'use strict';

const net = require('net');

const modules = {
  test: () => 'Test',
  echo: (data) => data,
};
const jobs = new Map(); // id -> {state, output}; never pruned, as in the original
let nextId = 1;

function parse(text) {
  const colon = text.indexOf(':');
  const name = (colon < 0 ? text : text.slice(0, colon)).replace(/[^a-zA-Z0-9\-_]/g, '');
  return [name, colon < 0 ? '' : text.slice(colon + 1)];
}

function run(name, data) {
  const module = modules[name];
  return module ? module(data) : '400: Unknown request';
}

function add(rest) {
  const [name, data] = parse(rest);
  const id = nextId++;
  const job = { state: 1, output: null };
  jobs.set(id, job);
  // The original started every job at once and its module answered asynchronously.
  setImmediate(() => {
    job.output = run(name, data);
    job.state = 2;
  });
  return `id:${id}`;
}

function job(rest) {
  // The original threw on an unknown id and its client waited forever; a peer that hangs
  // would hang the benchmark, so it answers an error instead.
  const found = jobs.get(Number(rest.replace(/^id:/, '')));
  return found || null;
}

function queue(data, reply) {
  const [command, rest] = parse(data);
  if (command === 'add') return reply(add(rest));
  const found = job(rest);
  if (!found) return reply('500: Unknown job');
  if (command === 'check') return reply(String(found.state));
  if (command !== 'get') return reply('500: Unknown queue request');
  const poll = () => (found.state === 2 ? reply(found.output) : setTimeout(poll, 1));
  return poll();
}

function answer(text, reply) {
  const [name, data] = parse(text.trim());
  if (name === 'helo') return reply('oleh');
  if (name === 'hello') return reply('olleh');
  if (name === 'queue') return queue(data, reply);
  return reply(run(name, data));
}

const server = net.createServer((socket) => {
  socket.on('error', () => {}); // a client that went away: nothing to do
  socket.once('data', (chunk) => {
    answer(chunk.toString(), (reply) => socket.end(reply));
  });
});
server.listen(Number(process.argv[2] || 0), '127.0.0.1', 1024, () => {
  console.log(server.address().port);
});
