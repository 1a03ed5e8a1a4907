// corepool's Node preload (embedded in the corepool binary; loaded through NODE_OPTIONS).
//
// corepool binds the public port once and hands the listening socket to every worker as fd 3
// (COREPOOL_LISTEN_FD). This makes an unmodified server adopt it: the first listen() on the
// public port (COREPOOL_PUBLIC_PORT) is redirected to listen({ fd: 3 }), and a listen({ fd: 3 })
// of its own (systemd socket activation, as SvelteKit's adapter-node does) is taken as that
// same public listen. The socket is bound to the public address, so server.address() shows the
// public port, and the kernel hands each worker real client connections.
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
    onMessage: env.COREPOOL_READY_ON === 'message',
    // Set once this process listens on the socket: it serves, so it launches nothing more.
    adopted: false,
    reported: false,
  };
  claimSocketActivation(env, state);
  installProcessSend(fs, state);
  if (state.listenFd < 0 || !(state.port > 0)) return;
  installHandDown(state);

  const net = require('net');
  const originalListen = net.Server.prototype.listen;

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
    if (state.adopted) return originalListen.apply(this, args);
    const first = args[0];
    // listen({ fd: 3 }) on corepool's own descriptor (systemd socket activation): the public
    // listen, as it is.
    if (first !== null && typeof first === 'object' && first.fd === state.listenFd) {
      state.adopted = true;
      this.once('listening', () => listened(fs, state));
      return originalListen.apply(this, args);
    }
    if (portOf(args) !== state.port) return originalListen.apply(this, args);
    state.adopted = true;
    const callback = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    this.once('listening', () => listened(fs, state));
    const fd = state.listenFd;
    return callback
      ? originalListen.call(this, { fd }, callback)
      : originalListen.call(this, { fd });
  };
})();

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
  if (state.listenFd === 3 && env.LISTEN_FDS === '1' && env.LISTEN_PID !== String(process.pid)) {
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
  const readyAt = state.readyFd < 0 ? -1 : take(Math.max(4, listenAt + 1));
  if (readyAt >= 0) stdio[readyAt] = state.readyFd;
  for (let i = 3; i < stdio.length; i++) if (stdio[i] === undefined) stdio[i] = 'ignore';
  options.stdio = stdio;
  setEnv('COREPOOL_LISTEN_FD', String(listenAt));
  setEnv('COREPOOL_READY_FD', readyAt >= 0 ? String(readyAt) : undefined);
  if (listenAt !== 3) SOCKET_ACTIVATION.forEach((name) => setEnv(name, undefined));
}
