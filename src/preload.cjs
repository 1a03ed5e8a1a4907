// corepool's Node preload (embedded in the corepool binary; loaded through NODE_OPTIONS).
//
// corepool binds the public port once and hands the listening socket to every worker as fd 3
// (COREPOOL_LISTEN_FD). This makes an unmodified server adopt it: the first listen() on the
// public port (COREPOOL_PUBLIC_PORT) is redirected to listen({ fd: 3 }), and a listen({ fd: 3 })
// of its own (systemd socket activation, as SvelteKit's adapter-node does) is taken as that
// same public listen. The socket is bound to the public address, so server.address() shows the
// public port, and the kernel hands each worker real client connections.
//
// With `--port 3000,4041` the further ports' sockets follow at fd 4.. (COREPOOL_EXTRA_PORTS =
// port:fd:inode,...), and a listen() on one of those ports gets that socket. A listen() on a
// port corepool was not told about gets reusePort where Node has it (22.12+, 23.1+), so every
// worker shares it; on older Node an EADDRINUSE there prints one line naming the --port list
// that shares it (see shareUnlisted). A reload's replacement whose predecessor still holds such
// a port (pm2's admin port of `base + NODE_APP_INSTANCE`) waits for it (waitForPredecessor).
//
// When that server is listening, "READY=1" is written to the readiness pipe (COREPOOL_READY_FD),
// which tells corepool this worker accepts connections; with COREPOOL_READY_ON=message, only
// when the app calls process.send('ready') (pm2's wait_ready).
//
// Descriptors are used only when they are provably corepool's: the socket's and the pipe's inode
// numbers come in COREPOOL_LISTEN_INODE / COREPOOL_READY_INODE, and fd 3 or 4 is touched only
// when fstat shows a socket (a FIFO) with that inode. In a node:cluster worker, or in a process
// a launcher started without them, fd 3 and 4 are something else (an IPC channel, an epoll
// descriptor) and are left alone.
//
// Launchers (`npm start`, pnpm, yarn, npx, dotenv-cli, tsx, a wrapper that spawns `node
// server.js`) are Node too: the server is their child or grandchild, and Node passes a child no
// descriptor above 2 unless asked. So every child a process starts before it has adopted the
// socket itself is given the two descriptors (as stdio 3 and 4 when those are free, else the
// next free slots, named in the child's COREPOOL_LISTEN_FD / COREPOOL_READY_FD); a process
// that only launches never listens on the port, so it never adopts the socket. node:cluster
// workers get nothing: their primary adopts the socket when the workers' listen reaches it.
//
// Only `require` and `process` are used, so the same text runs as CommonJS (--require FILE) and,
// wrapped by corepool with a createRequire prologue, as an ES module (--import data:...).
'use strict';
(function corepoolPreload() {
  const env = process.env;
  const fs = require('fs');
  const state = {
    // This process's own verified descriptors (-1: none).
    listenFd: corepoolDescriptor(fs, env.COREPOOL_LISTEN_FD, env.COREPOOL_LISTEN_INODE, 'socket'),
    readyFd: corepoolDescriptor(fs, env.COREPOOL_READY_FD, env.COREPOOL_READY_INODE, 'fifo'),
    port: Number(env.COREPOOL_PUBLIC_PORT),
    // The further ports of `--port 3000,4041`: port -> this process's verified descriptor.
    extra: extraPorts(fs, env.COREPOOL_EXTRA_PORTS),
    // Set once a listen() on the public port has been given corepool's socket.
    primaryTaken: false,
    onMessage: env.COREPOOL_READY_ON === 'message',
    // Set once this process listens on the socket: it serves, so it launches nothing more.
    adopted: false,
    reported: false,
  };
  state.listedExtra = [...state.extra.keys()];
  state.extraFds = new Set(state.extra.values());
  claimSocketActivation(env, state);
  installProcessSend(fs, state);
  const net = require('net');
  const originalListen = net.Server.prototype.listen;
  if (state.listenFd < 0 || !(state.port > 0)) {
    // Proxy mode (PORT is this worker's own private port), or a process without corepool's
    // descriptors: only the wait for a predecessor's ports.
    const own = Number(env.PORT);
    if (predecessors(env).length > 0) {
      net.Server.prototype.listen = function corepoolProxyListen(...args) {
        const port = portOf(args);
        if (Number.isInteger(port) && port > 0 && port !== own) {
          waitForPredecessor(fs, this, args, port, originalListen, () => false);
        }
        return originalListen.apply(this, args);
      };
    }
    return;
  }
  installHandDown(state);

  function portOf(args) {
    let first = args[0];
    if (first !== null && typeof first === 'object') {
      if (first.fd !== undefined || first.path !== undefined || first.handle !== undefined) {
        return undefined;
      }
      first = first.port;
    }
    if (typeof first === 'string' && /^[0-9]+$/.test(first)) first = Number(first);
    return first;
  }

  net.Server.prototype.listen = function corepoolListen(...args) {
    const first = args[0];
    const port = portOf(args);
    // A further port of the list: this listen takes that port's descriptor (once).
    if (typeof port === 'number' && state.extra.has(port)) {
      const fd = state.extra.get(port);
      state.extra.delete(port);
      state.adopted = true;
      return listenOnFd(this, fd, args);
    }
    if (first !== null && typeof first === 'object' && typeof first.fd === 'number' &&
        [...state.extraFds].includes(first.fd)) {
      state.adopted = true;
      return originalListen.apply(this, args);
    }
    // listen({ fd: 3 }) on corepool's own descriptor (systemd socket activation): the public
    // listen, as it is.
    if (first !== null && typeof first === 'object' && first.fd === state.listenFd &&
        !state.primaryTaken) {
      state.adopted = true;
      state.primaryTaken = true;
      this.once('listening', () => listened(fs, state));
      return originalListen.apply(this, args);
    }
    if (state.primaryTaken || port !== state.port) {
      if (port !== state.port && Number.isInteger(port) && port > 0) {
        return shareUnlisted(this, args, port);
      }
      return originalListen.apply(this, args);
    }
    state.adopted = true;
    state.primaryTaken = true;
    this.once('listening', () => listened(fs, state));
    return listenOnFd(this, state.listenFd, args);
  };

  function listenOnFd(server, fd, args) {
    const callback = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    return callback
      ? originalListen.call(server, { fd }, callback)
      : originalListen.call(server, { fd });
  }

  // A port corepool was not told about. Where Node's listen() takes reusePort (22.12+, 23.1+)
  // every worker binds it with SO_REUSEPORT, so they all share it as Node's cluster would.
  // Elsewhere the second worker's bind fails with EADDRINUSE: one line on stderr names the
  // port and the --port list that shares it, and if the app has no 'error' handler of its own
  // (the error would kill the worker, and every restart would fail the same way) this worker
  // serves on without that listener instead of crashing.
  function shareUnlisted(server, args, port) {
    if (reusePortSupported()) {
      const options = listenOptions(args);
      if (options) {
        options.opts.reusePort = true;
        return options.callback
          ? originalListen.call(server, options.opts, options.callback)
          : originalListen.call(server, options.opts);
      }
    }
    waitForPredecessor(fs, server, args, port, originalListen, () => {
      const listed = [state.port, ...state.listedExtra, port].join(',');
      const node = process.versions.node;
      const alone = server.listenerCount('error') === 0;
      try {
        fs.writeSync(2, `corepool: worker ${env.COREPOOL_WORKER || '?'}: port ${port} is not ` +
          `shared by the pool (EADDRINUSE; Node ${node} has no reusePort): list it, ` +
          `--port ${listed}` + (alone ? '; serving on without it\n' : '\n'));
      } catch (_) {
        // No stderr.
      }
      return alone;
    });
    return originalListen.apply(server, args);
  }

  // listen()'s arguments as one options object and a callback, or undefined.
  function listenOptions(args) {
    const callback = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    const rest = callback ? args.slice(0, -1) : args.slice();
    if (rest[0] !== null && typeof rest[0] === 'object') {
      return { opts: Object.assign({}, rest[0]), callback };
    }
    const opts = { port: rest[0] };
    let i = 1;
    if (typeof rest[i] === 'string' || rest[i] === null) {
      if (rest[i] !== null) opts.host = rest[i];
      i += 1;
    }
    if (typeof rest[i] === 'number') opts.backlog = rest[i];
    return { opts, callback };
  }
})();

// The process groups of the workers this one replaces (COREPOOL_REPLACES: corepool names the
// slot's workers still running when it starts this one: a reload's or a memory replacement's
// predecessor).
function predecessors(env) {
  return (env.COREPOOL_REPLACES || '').split(',').map(Number).filter((p) => Number.isInteger(p) && p > 1);
}

// Whether one of those groups still has a process (zombies included, until corepool reaps).
function predecessorLives(env) {
  return predecessors(env).some((pid) => {
    try {
      process.kill(-pid, 0);
      return true;
    } catch (error) {
      return error.code === 'EPERM';
    }
  });
}

// A listen() on a port corepool did not hand over (pm2's admin port of `base +
// NODE_APP_INSTANCE`): a replacement and the worker it replaces share the instance number,
// so the replacement's bind fails with EADDRINUSE while its predecessor still has the port.
// Node's cluster (pm2) shares the handle; without reusePort (Node < 22.12) corepool cannot, so
// the listen is tried again every RETRY_MS while a predecessor lives: the replacement gets
// ready on the public port, corepool stops the old worker, the port frees, and this listen
// completes ('listening' and the listen callback fire then). Once no predecessor is left,
// one last try; if that fails too, `fallback()` runs (true: the error is swallowed) and the
// app gets its error as without corepool. Without a predecessor (no reload: two live workers
// asking for the same port) the error comes at once, as before.
function waitForPredecessor(fs, server, args, port, originalListen, fallback) {
  const RETRY_MS = 100;
  const env = process.env;
  const callback = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
  const again = callback ? args.slice(0, -1) : args;
  let lastTry = false;
  let said = false;
  const retry = () => {
    // Node keeps the callback as a 'listening' listener across a failed listen (some
    // versions drop it): it must fire once.
    if (callback && !server.listeners('listening').includes(callback)) {
      server.once('listening', callback);
    }
    try {
      originalListen.apply(server, again);
    } catch (error) {
      server.emit = emit;
      server.emit('error', error);
    }
  };
  const emit = server.emit;
  server.emit = function corepoolEmit(name, error, ...rest) {
    if (name === 'error' && error && error.code === 'EADDRINUSE' && !lastTry &&
        predecessors(env).length > 0) {
      if (predecessorLives(env)) {
        if (!said) {
          said = true;
          try {
            fs.writeSync(2, `corepool: worker ${env.COREPOOL_WORKER || '?'}: port ${port} is ` +
              `still held, by the worker this one replaces (pid ${predecessors(env).join(',')}` +
              `): listening once it lets go\n`);
          } catch (_) {
            // No stderr.
          }
        }
        setTimeout(retry, RETRY_MS);
        return true;
      }
      lastTry = true;
      setImmediate(retry);
      return true;
    }
    if (name === 'error' && error && error.code === 'EADDRINUSE') {
      server.emit = emit;
      if (fallback()) return true;
    } else if (name === 'listening' || name === 'error') {
      server.emit = emit;
    }
    return emit.call(this, name, error, ...rest);
  };
}

// Whether net.Server's listen() takes reusePort (Node 22.12+, 23.1+).
function reusePortSupported() {
  const [major, minor] = process.versions.node.split('.').map(Number);
  return major > 23 || (major === 23 && minor >= 1) || (major === 22 && minor >= 12);
}

// COREPOOL_EXTRA_PORTS ("4041:4:INODE,...") as a Map port -> fd of the descriptors that are
// provably corepool's.
function extraPorts(fs, text) {
  const map = new Map();
  for (const item of (text || '').split(',')) {
    const [port, fd, inode] = item.split(':');
    const verified = corepoolDescriptor(fs, fd, inode, 'socket');
    if (Number(port) > 0 && verified >= 0) map.set(Number(port), verified);
  }
  return map;
}

// `fdText` as a descriptor number if that descriptor is corepool's: of the kind expected and
// with the inode corepool named; else -1. Never throws.
function corepoolDescriptor(fs, fdText, inodeText, kind) {
  const fd = Number(fdText);
  if (!Number.isInteger(fd) || fd < 3 || !/^[0-9]+$/.test(inodeText || '')) return -1;
  try {
    const st = fs.fstatSync(fd, { bigint: true });
    const rightKind = kind === 'socket' ? st.isSocket() : st.isFIFO();
    return rightKind && st.ino === BigInt(inodeText) ? fd : -1;
  } catch (_) {
    return -1;
  }
}

// systemd's LISTEN_PID names the process meant to use the descriptors. corepool sets it to the
// pid it started; in a launcher's child that holds the very socket at fd 3, the socket is this
// process's now, so a socket-activated server (adapter-node checks LISTEN_PID === process.pid)
// takes it.
function claimSocketActivation(env, state) {
  const extra = [...state.extra.values()];
  const inOrder = extra.every((fd, i) => fd === 4 + i);
  if (state.listenFd === 3 && inOrder && env.LISTEN_FDS === String(1 + extra.length) &&
      env.LISTEN_PID !== String(process.pid)) {
    env.LISTEN_PID = String(process.pid);
  }
}

// Writes READY=1 to corepool's pipe (once).
function reportReady(fs, state) {
  if (state.reported || state.readyFd < 0) return;
  state.reported = true;
  try {
    fs.writeSync(state.readyFd, 'READY=1\n');
  } catch (_) {
    // corepool went away or stopped reading: nothing to report to.
  }
}

// The public server listens: ready, unless readiness comes from process.send('ready').
function listened(fs, state) {
  if (!state.onMessage) reportReady(fs, state);
}

// pm2's wait_ready: apps call process.send('ready'), often unguarded, and under pm2 there is
// always an IPC channel. Without one, process.send is defined here: it accepts any message,
// calls the callback if one is given, and returns true. 'ready' reports readiness when
// COREPOOL_READY_ON=message (also through a real channel, e.g. under tsx, which gives its
// child one).
function installProcessSend(fs, state) {
  const original = typeof process.send === 'function' ? process.send : undefined;
  process.send = function send(message, ...rest) {
    if (message === 'ready' && state.onMessage) reportReady(fs, state);
    if (original) return original.call(process, message, ...rest);
    const callback = rest.find((a) => typeof a === 'function');
    if (callback) process.nextTick(callback, null);
    return true;
  };
}

// Hands corepool's descriptors down to the children this process starts (ChildProcess's spawn
// serves spawn, exec, execFile and fork), while this process has not adopted the socket.
function installHandDown(state) {
  const { ChildProcess } = require('child_process');
  const originalSpawn = ChildProcess.prototype.spawn;
  ChildProcess.prototype.spawn = function corepoolSpawn(options) {
    if (options !== null && typeof options === 'object') {
      try {
        handDown(options, state);
      } catch (_) {
        // Leave the child as the caller described it.
      }
    }
    return originalSpawn.call(this, options);
  };
}

function handDown(options, state) {
  const SOCKET_ACTIVATION = ['LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES'];
  const pairs = options.envPairs;
  if (!Array.isArray(pairs)) return;
  const value = (name) => {
    const pair = pairs.find((p) => typeof p === 'string' && p.startsWith(name + '='));
    return pair === undefined ? undefined : pair.slice(name.length + 1);
  };
  const setEnv = (name, text) => {
    for (let i = pairs.length - 1; i >= 0; i--) {
      if (typeof pairs[i] === 'string' && pairs[i].startsWith(name + '=')) pairs.splice(i, 1);
    }
    if (text !== undefined) pairs.push(name + '=' + text);
  };
  // Only a child that inherits corepool's markers can tell the descriptors are corepool's.
  if (value('COREPOOL_LISTEN_INODE') === undefined) return;
  let stdio = options.stdio === undefined || options.stdio === null ? 'pipe' : options.stdio;
  if (typeof stdio === 'string') stdio = [stdio, stdio, stdio];
  if (!Array.isArray(stdio)) return;
  // A node:cluster worker (its primary adopts the socket) or a child of the server itself.
  if (state.adopted || value('NODE_UNIQUE_ID') !== undefined) {
    SOCKET_ACTIVATION.forEach((name) => setEnv(name, undefined));
    return;
  }
  stdio = stdio.slice();
  while (stdio.length < 3) stdio.push(undefined);
  const free = (i) => stdio[i] === undefined || stdio[i] === null || stdio[i] === 'ignore';
  const take = (want) => {
    let i = want;
    while (!free(i)) i++;
    return i;
  };
  const listenAt = take(3);
  stdio[listenAt] = state.listenFd;
  // The further ports next (at 4.. when free, as corepool places them), then the pipe.
  let last = listenAt;
  const extra = [];
  for (const [port, fd] of state.extra) {
    last = take(last + 1);
    stdio[last] = fd;
    extra.push({ port, at: last, fd });
  }
  const readyAt = state.readyFd < 0 ? -1 : take(Math.max(4, last + 1));
  if (readyAt >= 0) stdio[readyAt] = state.readyFd;
  for (let i = 3; i < stdio.length; i++) if (stdio[i] === undefined) stdio[i] = 'ignore';
  options.stdio = stdio;
  setEnv('COREPOOL_LISTEN_FD', String(listenAt));
  setEnv('COREPOOL_READY_FD', readyAt >= 0 ? String(readyAt) : undefined);
  if (extra.length > 0) {
    // The inodes stay those corepool named: the child verifies the same sockets.
    const inodes = new Map((value('COREPOOL_EXTRA_PORTS') || '').split(',')
      .map((item) => item.split(':')).map(([port, , inode]) => [Number(port), inode]));
    setEnv('COREPOOL_EXTRA_PORTS',
      extra.map(({ port, at }) => `${port}:${at}:${inodes.get(port)}`).join(','));
  }
  const inOrder = listenAt === 3 && extra.every(({ at }, i) => at === 4 + i);
  if (!inOrder) SOCKET_ACTIVATION.forEach((name) => setEnv(name, undefined));
}

// ---- Drain on the stop signal -------------------------------------------------------------
//
// Node's default on SIGTERM is to die at once, and `server.close()` destroys idle keep-alive
// connections at once without `Connection: close`: either way a client that sends its next
// request on such a connection meanwhile gets a reset or an empty reply (20-25 lost requests
// per reload under `wrk -c20`). So every server the app makes listen (http, https, http2,
// net) is tracked, and when the stop signal (COREPOOL_STOP_SIGNAL, default SIGTERM) arrives:
// - each server stops accepting (a close() the app makes later is answered as the close it
//   would have been: its callback runs, without ERR_SERVER_NOT_RUNNING, once the server is
//   closed);
// - a response not yet started says `Connection: close` and its connection is closed after it,
//   and so does every response on a request that arrives later on an open connection;
// - a connection without a request in progress is closed after DRAIN_GRACE_MS if no request
//   came meanwhile (one may be on the wire); `server.close()` no longer destroys those at once;
// - an http2 session gets a GOAWAY that still admits the streams in flight, and is closed
//   (final GOAWAY, its streams finish) after DRAIN_GRACE_MS;
// - upgraded connections (WebSocket) and plain net connections are left to the app.
// If the app has no handler of its own for the signal, the process exits with code 0 once no
// HTTP connection is left (before, the signal killed it). If it has one, that handler runs
// after the drain: once no HTTP connection is left, or after DEFER_MAX_MS at most. A
// framework's own graceful shutdown (nitro's, in Nuxt: a vendored http-graceful-shutdown)
// destroys idle keep-alive connections at once, and every connection accepted after the
// signal; run first, it lost the requests clients had on the wire. Run after the drain, it
// finds nothing left to destroy and exits as it means to. Nothing acts before the first
// listen(), so a launcher (npm, a wrapper) behaves as before: its handlers run at once.
(function corepoolDrain() {
  const DRAIN_GRACE_MS = 1000;
  // The longest an app's own stop handler waits for the drain (well within --kill-timeout's
  // 10 s default, so that the handler still runs its cleanup).
  const DEFER_MAX_MS = 2 * DRAIN_GRACE_MS;
  const net = require('net');
  const http = require('http');
  const https = require('https');
  const wanted = process.env.COREPOOL_STOP_SIGNAL;
  const signal = /^SIG[A-Z0-9]+$/.test(wanted || '') ? wanted : 'SIGTERM';

  const servers = new Set(); // every server listening, or closed with connections left
  const wired = new WeakSet(); // servers the drain's listeners are attached to
  const conns = new Map(); // http/1 socket -> { server, active: Set of responses, timer }
  const sessions = new Set(); // open http2 sessions
  let installed = false;
  let draining = false;
  let exitWhenDrained = false;
  let closing = false; // the drain has stopped the servers
  let deferred = null; // the app's stop handlers waiting for the drain: [fn, this, args]
  let deferTimer = null;
  let released = false; // the app's stop handlers have run after the drain
  const drainClosed = new WeakSet(); // servers the drain closed
  const closeDone = new WeakSet(); // ... that have emitted 'close'
  const wrappers = new WeakMap(); // an app's stop listener -> the deferring one registered

  // An upgraded socket (WebSocket) has left the HTTP parser: it is the app's business now.
  function isHttp(socket) {
    return !!socket.parser && !socket.destroyed;
  }

  function isHttp2(server) {
    return !!server.constructor && /^Http2/.test(server.constructor.name);
  }

  // Connections of `server` the drain waits for: all it accepted (TLS handshakes included)
  // but the upgraded ones. A plain net server's connections are the app's business.
  function open(server) {
    if (!(server instanceof http.Server || server instanceof https.Server || isHttp2(server))) {
      return 0;
    }
    let n = server._connections || 0;
    for (const [socket, state] of conns) {
      if (state.server === server && !socket.destroyed && !socket.parser) n -= 1;
    }
    return n;
  }

  function drained() {
    for (const server of servers) if (server.listening || open(server) > 0) return false;
    return true;
  }

  function maybeDone() {
    if (deferred && drained()) release();
    if (!exitWhenDrained || !drained()) return;
    process.exit(0);
  }

  // Counts are updated as sockets are destroyed, a moment before their 'close' events.
  function checkSoon() {
    if (exitWhenDrained || deferred) setImmediate(maybeDone);
  }

  // The drain is over (or took too long): the app's own stop handlers run now, in order.
  function release() {
    clearTimeout(deferTimer);
    const calls = deferred || [];
    deferred = null;
    released = true;
    for (const [fn, self, args] of calls) fn.apply(self, args);
  }

  // The app's listener for the stop signal, as registered: it waits for the drain while one
  // runs (a signal before the first listen(), or after the drain, calls it at once).
  function deferring(fn) {
    const wrapped = function corepoolAfterDrain(...args) {
      if (installed && !draining) onStop();
      if (deferred) {
        deferred.push([fn, this, args]);
        return undefined;
      }
      return fn.apply(this, args);
    };
    // removeListener(fn) and listeners() see the app's own function (as for once()).
    wrapped.listener = fn.listener || fn;
    wrappers.set(fn, wrapped);
    return wrapped;
  }

  // Closes `socket` after the grace unless a request arrives on it meanwhile.
  function closeWhenIdle(socket, state) {
    if (state.timer || state.active.size > 0) return;
    state.timer = setTimeout(() => {
      state.timer = null;
      if (state.active.size > 0 || socket.destroyed) return;
      if (!isHttp(socket)) {
        checkSoon();
        return;
      }
      socket.end();
      setTimeout(() => socket.destroy(), DRAIN_GRACE_MS).unref();
    }, DRAIN_GRACE_MS);
  }

  function onSocket(socket) {
    const state = { server: this, active: new Set(), timer: null };
    conns.set(socket, state);
    socket.once('close', () => {
      clearTimeout(state.timer);
      conns.delete(socket);
      checkSoon();
    });
    if (draining) closeWhenIdle(socket, state);
  }

  function onRequest(req, res) {
    if (draining && !res.headersSent) res.shouldKeepAlive = false;
    const socket = req.socket;
    const state = conns.get(socket);
    if (!state) return;
    clearTimeout(state.timer);
    state.timer = null;
    state.active.add(res);
    res.once('close', () => {
      state.active.delete(res);
      // A response that went out as keep-alive before the drain: the client may send one more
      // request on it, which gets `Connection: close`; else it is closed after the grace.
      if (draining && !socket.destroyed) closeWhenIdle(socket, state);
    });
  }

  function goaway(session) {
    try {
      // "Shutting down; streams up to the last id still served": the client opens no new
      // stream, and one already on the wire is not refused.
      session.goaway(0, 2 ** 31 - 1);
    } catch (_) {
      // Already closing.
    }
    setTimeout(() => {
      if (!session.closed && !session.destroyed) session.close();
    }, DRAIN_GRACE_MS);
  }

  function onSession(session) {
    sessions.add(session);
    session.once('close', () => {
      sessions.delete(session);
      checkSoon();
    });
    if (draining) goaway(session);
  }

  function onStop() {
    // Every delivery asks again: a library like signal-exit removes its own handler and raises
    // the signal again to die of it, which leaves the exit (and the servers) to the drain.
    const appHandlers = process.listeners(signal).length > 0;
    if (!appHandlers) exitWhenDrained = true;
    if (!draining) {
      draining = true;
      for (const [socket, state] of conns) {
        for (const res of state.active) if (!res.headersSent) res.shouldKeepAlive = false;
        closeWhenIdle(socket, state);
      }
      for (const session of sessions) goaway(session);
      // The app's handlers (called right after this one) wait for the drain.
      if (appHandlers && !released) {
        deferred = [];
        deferTimer = setTimeout(release, DEFER_MAX_MS);
      }
    }
    // The servers stop accepting, as the signal means; a close() the app makes later (in its
    // handler, after the drain) gets its callback as if it had closed them.
    if (!closing) {
      closing = true;
      closeServers();
    }
    checkSoon();
  }

  function closeServers() {
    for (const server of servers) {
      if (!server.listening) continue;
      drainClosed.add(server);
      server.once('close', () => {
        closeDone.add(server);
        checkSoon();
      });
      try {
        server.close();
      } catch (_) {
        // Closed meanwhile.
      }
    }
    checkSoon();
  }

  // The drain's listener is not the app's: `process.listeners()` does not show it, so that
  // code deciding by it (signal-exit: "am I the last listener? then die of the signal") acts
  // as it would without corepool. listenerCount() still counts it: Node itself asks that to
  // decide whether to keep watching the signal.
  function hide() {
    for (const name of ['listeners', 'rawListeners']) {
      const original = process[name];
      if (typeof original !== 'function') continue;
      process[name] = function corepoolListeners(type, ...rest) {
        const list = original.call(this, type, ...rest);
        return type === signal ? list.filter((l) => l !== onStop) : list;
      };
    }
  }

  function track(server) {
    servers.add(server);
    if (wired.has(server)) return;
    wired.add(server);
    // A closed server has no connection left ('close' waits for them): forget it (port
    // probes such as get-port's open and close servers all the time).
    server.on('close', () => servers.delete(server));
    if (server instanceof https.Server) {
      server.on('secureConnection', onSocket);
      server.prependListener('request', onRequest);
    } else if (server instanceof http.Server) {
      server.on('connection', onSocket);
      server.prependListener('request', onRequest);
    }
    server.on('session', onSession); // http2 servers only
    if (!installed) {
      installed = true;
      try {
        process.prependListener(signal, onStop);
        hide();
      } catch (_) {
        // A signal Node cannot listen for: no drain.
      }
    }
  }

  const listen = net.Server.prototype.listen;
  net.Server.prototype.listen = function corepoolTrackedListen(...args) {
    track(this);
    return listen.apply(this, args);
  };
  // A server the drain closed: the app's own close() (http, https, http2 and tls servers all
  // end in this one) waits for 'close' as it would have, instead of failing with
  // ERR_SERVER_NOT_RUNNING (nitro exits with code 1 on that).
  const close = net.Server.prototype.close;
  net.Server.prototype.close = function corepoolClose(callback, ...rest) {
    if (!drainClosed.has(this) || this._handle) return close.call(this, callback, ...rest);
    if (typeof callback === 'function') {
      if (closeDone.has(this)) process.nextTick(callback);
      else this.once('close', () => callback());
    }
    return this;
  };
  // While draining, the idle connections are closed after the grace, not at once.
  for (const Server of [http.Server, https.Server]) {
    const closeIdle = Server.prototype.closeIdleConnections;
    if (typeof closeIdle !== 'function') continue;
    Server.prototype.closeIdleConnections = function corepoolCloseIdle(...args) {
      if (draining && (servers.has(this) || drainClosed.has(this))) return undefined;
      return closeIdle.apply(this, args);
    };
  }
  // The app's listeners for the stop signal are registered deferring (once() and
  // prependOnceListener() come through on() and prependListener()).
  for (const name of ['on', 'addListener', 'prependListener']) {
    const original = process[name];
    if (typeof original !== 'function') continue;
    process[name] = function corepoolStopListener(type, listener, ...rest) {
      if (type === signal && typeof listener === 'function' && listener !== onStop) {
        return original.call(this, type, deferring(listener), ...rest);
      }
      return original.call(this, type, listener, ...rest);
    };
  }
  for (const name of ['removeListener', 'off']) {
    const original = process[name];
    if (typeof original !== 'function') continue;
    process[name] = function corepoolRemoveStopListener(type, listener, ...rest) {
      if (type === signal && wrappers.has(listener)) {
        return original.call(this, type, wrappers.get(listener), ...rest);
      }
      return original.call(this, type, listener, ...rest);
    };
  }
})();
