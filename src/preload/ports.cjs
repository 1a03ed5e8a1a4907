// ports.cjs: which port a listen() asks for, the further ports of the list, ports corepool
// was not told about, and the wait for a reload's predecessor to let go of a port.
//
// With `--port 3000,4041` the further ports' sockets follow at fd 4.. (COREPOOL_EXTRA_PORTS =
// port:fd:inode,...), and a listen() on one of those ports gets that socket. A listen() on a
// port corepool was not told about gets reusePort where Node has it (22.12+, 23.1+), so every
// worker shares it; on older Node an EADDRINUSE there prints one line naming the --port list
// that shares it (see shareUnlisted). A reload's replacement whose predecessor still holds such
// a port (pm2's admin port of `base + NODE_APP_INSTANCE`) waits for it (waitForPredecessor).

// Outside socket mode (proxy mode: PORT is this worker's own private port; or a process
// without corepool's descriptors): a listen() on any other port waits for a predecessor.
function installPredecessorWait(fs, env, net, originalListen) {
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
}

// The port a listen() asks for (a number, or a string of digits as given), or undefined for
// a listen on a descriptor, a path or a handle.
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

// A port corepool was not told about. Where Node's listen() takes reusePort (22.12+, 23.1+)
// every worker binds it with SO_REUSEPORT, so they all share it as Node's cluster would.
// Elsewhere the second worker's bind fails with EADDRINUSE: one line on stderr names the
// port and the --port list that shares it, and if the app has no 'error' handler of its own
// (the error would kill the worker, and every restart would fail the same way) this worker
// serves on without that listener instead of crashing.
function shareUnlisted(fs, env, state, server, args, port, originalListen) {
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
