// corepool's Node preload (embedded in the corepool binary; loaded through NODE_OPTIONS).
//
// corepool binds the public port once and hands the listening socket to every worker as fd 3
// (COREPOOL_LISTEN_FD). This makes an unmodified server adopt it: the first listen() on the
// public port (COREPOOL_PUBLIC_PORT) is redirected to listen({ fd: 3 }). The socket is bound to
// the public address, so server.address() shows the public port, and the kernel hands each
// worker real client connections (req.socket.remoteAddress is the client).
//
// When that server is listening, "READY=1" is written to the readiness pipe (COREPOOL_READY_FD),
// which tells corepool this worker accepts connections.
//
// Only `require` and `process` are used, so the same text runs as CommonJS (--require FILE) and,
// wrapped by corepool with a createRequire prologue, as an ES module (--import data:...).
'use strict';
(function corepoolPreload() {
  const env = process.env;
  const fd = Number(env.COREPOOL_LISTEN_FD);
  const port = Number(env.COREPOOL_PUBLIC_PORT);
  const readyFd = Number(env.COREPOOL_READY_FD);
  // Not checked against LISTEN_PID on purpose: with `npm start` the server is a grandchild of
  // corepool that inherits fd 3, and it is the first process to listen on the public port.
  if (!Number.isInteger(fd) || !(port > 0)) return;

  const net = require('net');
  const fs = require('fs');
  const originalListen = net.Server.prototype.listen;
  let taken = false;

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

  function reportReady() {
    if (!Number.isInteger(readyFd)) return;
    try {
      fs.writeSync(readyFd, 'READY=1\n');
      fs.closeSync(readyFd);
    } catch (_) {
      // corepool went away or the pipe is closed: nothing to report to.
    }
  }

  net.Server.prototype.listen = function corepoolListen(...args) {
    if (taken || portOf(args) !== port) return originalListen.apply(this, args);
    taken = true;
    const callback = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    this.once('listening', reportReady);
    return callback
      ? originalListen.call(this, { fd }, callback)
      : originalListen.call(this, { fd });
  };
})();
