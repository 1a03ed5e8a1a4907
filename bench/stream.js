// Relay benchmark server: GET /bulk?mb=N streams N MiB, POST reads the body and answers its
// length, anything else answers "hello". Listens on $PORT.
const http = require('http');
const chunk = Buffer.alloc(1 << 20, 97);
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/bulk')) {
    let left = Number(new URL(req.url, 'http://x').searchParams.get('mb') || 100);
    res.writeHead(200, {'content-length': left * chunk.length});
    const pump = () => { while (left > 0) { left--; if (!res.write(chunk)) return res.once('drain', pump); } res.end(); };
    return pump();
  }
  if (req.method === 'POST') { let n = 0; req.on('data', d => n += d.length); req.on('end', () => res.end(String(n))); return; }
  res.end('hello\n');
});
// Idle keep-alive connections are held for the --proxies idle scenario (Node's default: 5 s).
server.keepAliveTimeout = 120000;
server.listen(Number(process.env.PORT || 3000));
