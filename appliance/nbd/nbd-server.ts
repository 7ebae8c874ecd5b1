/**
 * A TCP server exporting ONE committed image read-only over NBD (issue 9,
 * item 1). Thin adapter: sockets here, the protocol in nbd-codec.ts and the
 * decisions in nbd-session.ts. Not wired into the appliance yet (mounts as
 * catalog objects come later); tests and a later mount command start it.
 */
import { createServer, type Server, type Socket } from 'node:net';
import type { Logger } from 'pino';
import type { ChunkStore } from '../store/chunk-store.js';
import { ImageSource } from './image-source.js';
import { NbdSession } from './nbd-session.js';

export interface NbdServerOptions {
  store: ChunkStore;
  /** Root digest of the image to export. */
  rootDigest: Buffer;
  exportName: string;
  host?: string;
  /** 0 (default) picks a free port. */
  port?: number;
  /** Decompressed chunks kept per server (LRU). */
  cacheChunks?: number;
  logger?: Logger;
}

export class NbdServer {
  private constructor(
    private readonly server: Server,
    private readonly sockets: Set<Socket>,
    readonly host: string,
    readonly port: number,
  ) {}

  static async start(opts: NbdServerOptions): Promise<NbdServer> {
    const source = await ImageSource.open(opts.store, opts.rootDigest, opts.cacheChunks);
    const host = opts.host ?? '127.0.0.1';
    const sockets = new Set<Socket>();
    const server = createServer({ noDelay: true }, (socket) => {
      sockets.add(socket);
      const session = new NbdSession(source, opts.exportName, {
        write: (bytes) =>
          new Promise<void>((resolve, reject) => {
            if (socket.destroyed) return reject(new Error('nbd: connection closed'));
            if (socket.write(bytes)) return resolve();
            // Buffer full: wait for it to drain (backpressure), listeners removed either way.
            const settle = (err?: Error): void => {
              socket.off('drain', onDrain);
              socket.off('close', onClose);
              if (err) reject(err);
              else resolve();
            };
            const onDrain = (): void => settle();
            const onClose = (): void => settle(new Error('nbd: connection closed'));
            socket.on('drain', onDrain).on('close', onClose);
          }),
        end: () => socket.end(),
        pause: () => socket.pause(),
        resume: () => socket.resume(),
      }, opts.logger);
      socket.on('data', (b: Buffer) => session.receive(b));
      socket.on('error', (err) => opts.logger?.debug({ err }, 'nbd: socket error'));
      socket.on('close', () => {
        sockets.delete(socket);
        session.dispose();
      });
      session.start().catch(() => socket.destroy());
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
    return new NbdServer(server, sockets, host, port);
  }

  /** nbd://host:port/name, as libnbd clients take it. */
  uri(exportName: string): string {
    return `nbd://${this.host}:${this.port}/${encodeURIComponent(exportName)}`;
  }

  get connections(): number { return this.sockets.size; }

  /** Stop listening and drop every client. */
  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const s of this.sockets) s.destroy();
    await closed;
  }
}
