// A plain Node HTTP server, unaware of corepool: it listens on $PORT like any other.
// Under corepool every worker serves the same port; the answer says which one replied.
const http = require('http');

const port = Number(process.env.PORT || 3000);
const worker = process.env.COREPOOL_WORKER ?? '-';

const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({
    worker,
    pid: process.pid,
    client: req.socket.remoteAddress,
    path: req.url,
  }) + '\n');
});

server.listen(port, () => {
  const { address, port: bound } = server.address();
  console.log(`worker ${worker} (pid ${process.pid}) listening on ${address}:${bound}`);
});

// Graceful stop, as Next.js does: stop accepting, let in-flight requests finish, then exit.
// (Under corepool the preload also closes keep-alive connections politely meanwhile.)
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
});
