// corepool's Node preload (embedded in the corepool binary; loaded through NODE_OPTIONS).
//
// One script in five parts, joined in this order by src/node.rs (PRELOAD):
// - start.cjs (this file): the shared state and what runs at load, in order;
// - adopt.cjs: socket mode's listen() on the public port adopts corepool's socket (fd 3),
//   verified by its inode marker, and launchers hand the descriptors down to their children;
// - ports.cjs: further ports (`--port 3000,4041`), ports corepool was not told about
//   (reusePort), and the wait for a reload's predecessor to let go of a port (COREPOOL_REPLACES);
// - ready.cjs: readiness (READY=1 on the pipe; process.send('ready') with --ready-on message);
// - drain.cjs: the drain on the stop signal (in proxy mode too), self-contained.
// The parts other than start.cjs and drain.cjs only declare functions (hoisted, so the code
// below may call them); what they share is the one `state` object built here, passed to them
// with `fs` and `env` as arguments, never a hidden global.
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
    installPredecessorWait(fs, env, net, originalListen);
    return;
  }
  installHandDown(state);
  installAdoptingListen(fs, env, state, net, originalListen);
})();
