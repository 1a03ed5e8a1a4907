// ready.cjs: readiness. When the public server is listening (socket mode), "READY=1" is
// written to the readiness pipe (COREPOOL_READY_FD), which tells corepool this worker accepts
// connections; with COREPOOL_READY_ON=message, only when the app calls process.send('ready')
// (pm2's wait_ready).

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
