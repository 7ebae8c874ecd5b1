/**
 * The appliance's NBD server (issue 9): a TCP listener serving many exports,
 * each found by an injected resolver (nbd-export.ts) when a client names it.
 * Thin adapter: sockets and TLS here, the protocol in nbd-codec.ts and the
 * decisions in nbd-session.ts.
 *
 * TLS: with `tls` set the server offers NBD_OPT_STARTTLS and requires it
 * before any export is named; the plain socket is wrapped in place by a
 * server-side TLSSocket (node:tls), and everything after goes through it.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { TLSSocket, createSecureContext, type SecureContext } from 'node:tls';
import type { Logger } from 'pino';
import type { NbdExport, NbdExportResolver } from './nbd-export.js';
import { NbdSession } from './nbd-session.js';

export interface NbdServerOptions {
  resolve: NbdExportResolver;
  host?: string;
  /** 0 (default) picks a free port. */
  port?: number;
  /** PEM key and certificate: STARTTLS offered and required (nbds:// clients). */
  tls?: { key: string | Buffer; cert: string | Buffer };
  logger?: Logger;
}

/** A resolver serving one export under one name to anyone (tests, tools). */
export function fixedExport(name: string, exp: NbdExport): NbdExportResolver {
  return async (asked) => (asked === name ? exp : undefined);
}

/** How long a client may take for its TLS handshake after STARTTLS. */
const TLS_HANDSHAKE_MS = 30_000;

export class NbdServer {
  private constructor(
    private readonly server: Server,
    private readonly sockets: Set<{ destroy(): void }>,
    readonly host: string,
    readonly port: number,
    readonly tls: boolean,
  ) {}

  static async start(opts: NbdServerOptions): Promise<NbdServer> {
    const host = opts.host ?? '127.0.0.1';
    const sockets = new Set<{ destroy(): void }>();
    const secureContext: SecureContext | undefined = opts.tls ? createSecureContext({ key: opts.tls.key, cert: opts.tls.cert }) : undefined;
    const server = createServer({ noDelay: true }, (raw) => {
      const conn = { destroy: () => { io.destroy(); raw.destroy(); } };
      sockets.add(conn);
      // The stream the session talks through: the TCP socket, then its TLS wrapper.
      let io: Socket = raw;
      const onData = (b: Buffer): void => session.receive(b);
      let drained: Promise<void> | undefined;
      const waitDrain = (s: Socket): Promise<void> => {
        drained ??= new Promise<void>((resolve, reject) => {
          const settle = (err?: Error): void => {
            s.off('drain', onDrain);
            s.off('close', onClose);
            drained = undefined;
            if (err) reject(err);
            else resolve();
          };
          const onDrain = (): void => settle();
          const onClose = (): void => settle(new Error('nbd: connection closed'));
          s.on('drain', onDrain).on('close', onClose);
        });
        return drained;
      };
      const pipe = {
        write: (bytes: Buffer | Buffer[]) =>
          new Promise<void>((resolve, reject) => {
            const s = io;
            if (s.destroyed) return reject(new Error('nbd: connection closed'));
            let ok: boolean;
            if (Array.isArray(bytes)) {
              // Corked: the pieces go out together (one writev), nothing in between.
              s.cork();
              ok = true;
              for (const b of bytes) ok = s.write(b) && ok;
              s.uncork();
            } else {
              ok = s.write(bytes);
            }
            if (ok) return resolve();
            // Buffer full: every writer waits for the same drain (one listener pair per connection).
            waitDrain(s).then(resolve, reject);
          }),
        end: () => io.end(),
        destroy: () => conn.destroy(),
        pause: () => io.pause(),
        resume: () => io.resume(),
        startTls: secureContext
          ? (reply: Buffer) =>
              new Promise<void>((resolve, reject) => {
                // Same tick: the ACK is queued in plaintext and the raw socket
                // stops feeding the session before the client's ClientHello.
                raw.write(reply);
                raw.off('data', onData);
                const tls = new TLSSocket(raw, { isServer: true, secureContext });
                io = tls;
                const timer = setTimeout(() => tls.destroy(new Error('nbd: TLS handshake timed out')), TLS_HANDSHAKE_MS);
                tls.on('close', onClose);
                tls.once('secure', () => {
                  clearTimeout(timer);
                  tls.on('data', onData);
                  resolve();
                });
                tls.on('error', (err) => {
                  clearTimeout(timer);
                  opts.logger?.debug({ err }, 'nbd: TLS error');
                  reject(err);
                  raw.destroy();
                });
              })
          : undefined,
      };
      const session = new NbdSession(opts.resolve, { address: raw.remoteAddress ?? '' }, pipe, {
        log: opts.logger,
        tls: secureContext !== undefined,
      });
      raw.on('data', onData);
      raw.on('error', (err) => opts.logger?.debug({ err }, 'nbd: socket error'));
      let ended = false;
      const onClose = (): void => {
        if (ended) return;
        ended = true;
        sockets.delete(conn);
        session.dispose();
      };
      raw.on('close', onClose);
      session.start().catch(() => raw.destroy());
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port ?? 0, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    const addr = server.address();
    const port = typeof addr === 'object' && addr ? addr.port : 0;
    return new NbdServer(server, sockets, host, port, secureContext !== undefined);
  }

  /** nbd://host:port/name (nbds:// with TLS), as libnbd clients take it. */
  uri(exportName: string): string {
    return `${this.tls ? 'nbds' : 'nbd'}://${this.host}:${this.port}/${encodeURIComponent(exportName)}`;
  }

  get connections(): number { return this.sockets.size; }

  /** Stop listening and drop every client. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
  }
}
