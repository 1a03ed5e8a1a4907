// The app of the container tests: a plain Node HTTP server on $PORT, as a user's would be.
//   GET /            {"worker", "pid", "heap_mib"} (heap_mib: V8's old-space limit)
//   GET /slow?ms=N   answers after N ms (a request in flight during a stop); logs "slow start"
// APP_MODE changes it: `crash` exits 3 at once; `ignore-term` ignores SIGTERM and never exits by
// itself (and says "SIGTERM trap set" once it does); `no-listen` never listens (never ready).
const http = require('http');
const v8 = require('v8');

const mode = process.env.APP_MODE || 'serve';
const worker = process.env.COREPOOL_WORKER ?? '-';
if (mode === 'crash') {
  console.error(`worker ${worker}: crashing at start`);
  process.exit(3);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  const answer = () => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({
      worker,
      pid: process.pid,
      heap_mib: Math.round(v8.getHeapStatistics().heap_size_limit / 1048576),
    }) + '\n');
  };
  if (url.pathname === '/slow') {
    console.log(`worker ${worker}: slow start`);
    setTimeout(answer, Number(url.searchParams.get('ms') || 1000));
  } else {
    answer();
  }
});

if (mode === 'ignore-term') {
  // A stuck worker: the signal changes nothing and the process never ends by itself (a timer
  // keeps it alive once corepool's preload has closed its server at the signal).
  process.on('SIGTERM', () => console.log(`worker ${worker}: SIGTERM ignored`));
  setInterval(() => {}, 1 << 30);
  console.log(`worker ${worker}: SIGTERM trap set`);
} else {
  // Graceful stop: finish the requests in flight, then exit.
  process.on('SIGTERM', () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections?.();
  });
}
if (mode !== 'no-listen') {
  server.listen(Number(process.env.PORT || 3000), () => {
    console.log(`worker ${worker} (pid ${process.pid}) listening`);
  });
} else {
  setInterval(() => {}, 1 << 30);
}
