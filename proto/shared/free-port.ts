/**
 * A TCP port nothing listens on right now on 127.0.0.1 (for a PostgreSQL copy,
 * a test server, a benchmark's peer). A race with other programs remains
 * between this answer and the caller's bind: callers that can, retry.
 */
import net from 'node:net';

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}
