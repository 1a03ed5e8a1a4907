// drain.cjs: the drain on the stop signal, and the deferral of the app's own stop listeners
// until the drain is over. Self-contained (its own closure); it runs after start.cjs, so its
// listen() wrapper is the outermost one.
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
  // https costs a worker a few ms of CPU to load: it is loaded when a TLS server first listens
  // (the app has loaded tls by then, most of that cost), never for a plain HTTP app.
  let https = null;
  const wanted = process.env.COREPOOL_STOP_SIGNAL;
  const signal = /^SIG[A-Z0-9]+$/.test(wanted || '') ? wanted : 'SIGTERM';

  const servers = new Set(); // every server listening, or closed with connections left
  const wired = new WeakSet(); // servers the drain's listeners are attached to
  // http/1 socket -> its server until the stop signal, a Conn from then on. Until the signal a
  // connection costs the drain one map entry and a shared 'close' listener, nothing more.
  const conns = new Map();
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
  const watched = new WeakSet(); // servers whose requests the drain follows (from the stop on)

  // An upgraded socket (WebSocket) has left the HTTP parser: it is the app's business now.
  function isHttp(socket) {
    return !!socket.parser && !socket.destroyed;
  }

  function isHttps(server) {
    return https !== null && server instanceof https.Server;
  }

  function isHttp2(server) {
    return !!server.constructor && /^Http2/.test(server.constructor.name);
  }

  // Connections of `server` the drain waits for: all it accepted (TLS handshakes included)
  // but the upgraded ones. A plain net server's connections are the app's business.
  function open(server) {
    if (!(server instanceof http.Server || isHttps(server) || isHttp2(server))) {
      return 0;
    }
    let n = server._connections || 0;
    for (const [socket, known] of conns) {
      const owner = known instanceof Conn ? known.server : known;
      if (owner === server && !socket.destroyed && !socket.parser) n -= 1;
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
    adopt(socket, state);
    if (state.timer || state.active.size > 0) return;
    state.timer = setTimeout(() => {
      state.timer = null;
      adopt(socket, state);
      if (state.active.size > 0 || socket.destroyed) return;
      if (!isHttp(socket)) {
        checkSoon();
        return;
      }
      socket.end();
      setTimeout(() => socket.destroy(), DRAIN_GRACE_MS).unref();
    }, DRAIN_GRACE_MS);
  }

  // What the drain knows of a connection once it has begun.
  class Conn {
    constructor(server) {
      this.server = server;
      this.active = new Set(); // responses in progress
      this.timer = null;
    }
  }

  // The connection's Conn, made at the first look after the stop signal.
  function connOf(socket) {
    const known = conns.get(socket);
    if (known === undefined || known instanceof Conn) return known;
    const conn = new Conn(known);
    conns.set(socket, conn);
    return conn;
  }

  function onSocket(socket) {
    conns.set(socket, this);
    socket.on('close', onSocketClose);
    if (draining) closeWhenIdle(socket, connOf(socket));
  }

  function onSocketClose() {
    const known = conns.get(this);
    if (known instanceof Conn) clearTimeout(known.timer);
    conns.delete(this);
    checkSoon();
  }

  // Requests are followed from the stop signal on only (and a connection costs a map entry
  // and a shared listener until then: no object, set, closure or once() wrapper of its own):
  // until then the drain costs an HTTP/1 request nothing (following each one cost a hello-world worker 3 of its 58 us of CPU per
  // keep-alive request behind the proxy; workers without the preload: 55). At the signal,
  // the response each connection has in progress is found where Node keeps it
  // (`socket._httpMessage`, set while a response is made, cleared or replaced by the next
  // pipelined one when it is done), and each request after it comes through `onRequest`.
  function onRequest(req, res) {
    if (draining && !res.headersSent) res.shouldKeepAlive = false;
    const socket = req.socket;
    const state = connOf(socket);
    if (!state) return;
    clearTimeout(state.timer);
    state.timer = null;
    follow(res, socket, state);
  }

  // The drain waits for `res` and, not started yet, it says `Connection: close`.
  function follow(res, socket, state) {
    if (draining && !res.headersSent) res.shouldKeepAlive = false;
    state.active.add(res);
    res.once('close', () => {
      state.active.delete(res);
      // A response that went out as keep-alive before the drain: the client may send one more
      // request on it, which gets `Connection: close`; else it is closed after the grace.
      if (draining && !socket.destroyed) closeWhenIdle(socket, state);
    });
  }

  // The response in progress on `socket` when the drain looks, followed if it is not yet.
  function adopt(socket, state) {
    const res = socket._httpMessage;
    if (res && typeof res.once === 'function' && !state.active.has(res)) {
      follow(res, socket, state);
    }
  }

  function watchRequests(server) {
    if (watched.has(server)) return;
    watched.add(server);
    server.prependListener('request', onRequest);
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
      for (const server of servers) watchRequests(server);
      for (const socket of conns.keys()) {
        const state = connOf(socket); // replaces the entry's value: the iteration goes on
        watchRequests(state.server); // a server closed with connections left, too
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
    if (https === null && typeof server.setSecureContext === 'function') {
      https = require('https');
      deferIdleClose(https.Server);
    }
    if (isHttps(server)) {
      server.on('secureConnection', onSocket);
      if (draining) watchRequests(server);
    } else if (server instanceof http.Server) {
      server.on('connection', onSocket);
      if (draining) watchRequests(server);
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
  // While draining, the idle connections are closed after the grace, not at once (https's
  // servers have a copy of the method of their own, deferred when https is loaded).
  function deferIdleClose(Server) {
    const closeIdle = Server.prototype.closeIdleConnections;
    if (typeof closeIdle !== 'function') return;
    Server.prototype.closeIdleConnections = function corepoolCloseIdle(...args) {
      if (draining && (servers.has(this) || drainClosed.has(this))) return undefined;
      return closeIdle.apply(this, args);
    };
  }
  deferIdleClose(http.Server);
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
