// adopt.cjs: socket mode's adoption of corepool's listening socket, and its hand-down by
// launchers.
//
// corepool binds the public port once and hands the listening socket to every worker as fd 3
// (COREPOOL_LISTEN_FD). This makes an unmodified server adopt it: the first listen() on the
// public port (COREPOOL_PUBLIC_PORT) is redirected to listen({ fd: 3 }), and a listen({ fd: 3 })
// of its own (systemd socket activation, as SvelteKit's adapter-node does) is taken as that
// same public listen. The socket is bound to the public address, so server.address() shows the
// public port, and the kernel hands each worker real client connections.
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

// The listen() of socket mode: the first one on the public port, or a listen({ fd }) on one of
// corepool's descriptors, adopts corepool's socket; a further port of the list takes its own
// (ports.cjs); any other port goes to shareUnlisted (ports.cjs).
function installAdoptingListen(fs, env, state, net, originalListen) {
  net.Server.prototype.listen = function corepoolListen(...args) {
    const first = args[0];
    const port = portOf(args);
    // A further port of the list: this listen takes that port's descriptor (once).
    if (typeof port === 'number' && state.extra.has(port)) {
      const fd = state.extra.get(port);
      state.extra.delete(port);
      state.adopted = true;
      return listenOnFd(this, fd, args, originalListen);
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
        return shareUnlisted(fs, env, state, this, args, port, originalListen);
      }
      return originalListen.apply(this, args);
    }
    state.adopted = true;
    state.primaryTaken = true;
    this.once('listening', () => listened(fs, state));
    return listenOnFd(this, state.listenFd, args, originalListen);
  };
}

function listenOnFd(server, fd, args, originalListen) {
  const callback = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
  return callback
    ? originalListen.call(server, { fd }, callback)
    : originalListen.call(server, { fd });
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
