import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { WebSocket, WebSocketServer, type RawData } from 'ws';
import { BlocksnapError, toBlocksnapError } from './errors.js';
import { decodeSingleFrame, DEFAULT_MAX_FRAME_BYTES, encodeFrame, FRAME_HEADER_BYTES } from './codec.js';
import type { Envelope } from './messages.js';
import { largeFrames } from './shared/buffer-pool.js';
import { CloseCode, closeCodeFor, closeReason, disconnected, fitCloseReason, isSendableCloseCode, TransportBase, type Transport } from './transport.js';
import { createServer as createHttpsServer } from 'node:https';

/**
 * Transport over a `ws` WebSocket (DESIGN.md §4.1): one binary message = one
 * frame. A text message or a bad frame closes with 1008, a message over the
 * limit with 1009 (ws enforces `maxPayload` before buffering it).
 */

export const AGENT_PATH = '/v1/agent';

export interface WsTransportOptions {
  /** Largest envelope accepted or sent (default 8 MiB). */
  maxFrameBytes?: number;
}

/**
 * Server side: what a peer may send before `authenticated()` is called on
 * its transport (DESIGN.md §4.2). ws has one `maxPayload` per server, so the
 * bound is kept at the socket: every byte read is counted before ws buffers
 * it, and a peer past `maxBytes` is cut off (close 1009, then the socket is
 * destroyed, so no close handshake keeps it reading). Frames are decoded
 * with `maxBytes` as their limit until then.
 */
export interface PreAuthOptions {
  maxBytes: number;
  /**
   * Every accepted TCP connection, before a byte of HTTP is parsed; false
   * destroys it at once (the cheapest refusal: bounds on connections that
   * have not authenticated start here, not at the upgrade).
   */
  onSocket?: (socket: Socket) => boolean;
  /** Refuses an upgrade (HTTP status + reason) before any WebSocket exists; null admits it. */
  admit?: (req: IncomingMessage) => { status: number; reason: string } | null;
}

/** Options a `WebSocketServer` serving transports must be created with. */
export function wsServerOptions(maxFrameBytes = DEFAULT_MAX_FRAME_BYTES): { maxPayload: number; perMessageDeflate: false } {
  // Chunk data is already zstd-compressed: deflate would only burn CPU.
  return { maxPayload: maxFrameBytes + FRAME_HEADER_BYTES, perMessageDeflate: false };
}

class WsTransport extends TransportBase {
  private failure: BlocksnapError | undefined;
  /** Limit for decoding received frames: small until `authenticated()` on a server transport. */
  private receiveLimit: number;
  private preAuth: { socket: Socket; maxBytes: number; read: number; onData: (b: Buffer) => void } | null = null;

  constructor(
    private readonly ws: WebSocket,
    readonly remote: string,
    private readonly maxFrameBytes: number,
    preAuth?: { socket: Socket; maxBytes: number },
  ) {
    super();
    this.receiveLimit = maxFrameBytes;
    if (preAuth) {
      this.receiveLimit = Math.min(maxFrameBytes, preAuth.maxBytes);
      const p = { ...preAuth, read: 0, onData: (b: Buffer) => this.countPreAuth(b.length) };
      this.preAuth = p;
      // Prepended: counted before ws's own listener buffers the bytes.
      p.socket.prependListener('data', p.onData);
    }
    ws.on('message', (data, isBinary) => this.received(data, isBinary));
    ws.on('error', (err) => this.socketError(err));
    ws.on('close', (code, reason) => this.socketClosed(code, reason.toString()));
  }

  /** Lifts the pre-authentication bounds: frames up to maxFrameBytes from now on. */
  authenticated(): void {
    if (!this.preAuth) return;
    this.preAuth.socket.removeListener('data', this.preAuth.onData);
    this.preAuth = null;
    this.receiveLimit = this.maxFrameBytes;
  }

  private countPreAuth(n: number): void {
    const p = this.preAuth!;
    p.read += n;
    if (p.read <= p.maxBytes) return;
    this.failure ??= new BlocksnapError('E_FRAME_TOO_LARGE', `${this.remote} sent more than ${p.maxBytes} bytes before authenticating`);
    if (!this.closing) {
      this.closing = true;
      this.ws.close(CloseCode.MESSAGE_TOO_BIG, closeReason(this.failure));
    }
    // The close frame is written at once; then stop reading, so the peer cannot make us buffer more.
    setImmediate(() => this.ws.terminate());
  }

  get bufferedAmount(): number {
    return this.ws.bufferedAmount;
  }

  send(env: Envelope): Promise<void> {
    if (this.closing || this.ws.readyState !== WebSocket.OPEN) return Promise.reject(disconnected(this.remote));
    let frame: Buffer;
    try {
      // A chunk batch goes into a reused buffer (shared/buffer-pool.ts), given back once it is written.
      frame = encodeFrame(env, this.maxFrameBytes, takeLargeFrame);
    } catch (e) {
      return Promise.reject(toBlocksnapError(e));
    }
    return new Promise((resolve, reject) => {
      this.ws.send(frame, { binary: true, compress: false }, (err) => {
        if (err) return reject(disconnected(this.remote, err));
        // ws calls back once the socket wrote the frame: nothing refers to it any more.
        largeFrames.give(frame.buffer);
        resolve();
      });
    });
  }

  close(code: number = CloseCode.NORMAL, reason = ''): void {
    if (this.closing) return;
    this.closing = true;
    if (!isSendableCloseCode(code)) code = CloseCode.INTERNAL_ERROR;
    reason = fitCloseReason(reason);
    this.ws.close(code, reason);
    // A peer that never authenticated gets no close handshake to stall on (ws would wait 30 s for its answer).
    if (this.preAuth) setImmediate(() => this.ws.terminate());
  }

  protected abort(err: BlocksnapError): void {
    this.fail(err, CloseCode.INTERNAL_ERROR);
  }

  private fail(err: BlocksnapError, code: number): void {
    this.failure ??= err;
    if (this.closing) return;
    this.closing = true;
    this.ws.close(code, closeReason(err));
  }

  private received(data: RawData, isBinary: boolean): void {
    if (this.closing) return;
    if (!isBinary) {
      this.fail(new BlocksnapError('E_FRAME_MALFORMED', `text message from ${this.remote}`), CloseCode.POLICY_VIOLATION);
      return;
    }
    let env: Envelope;
    try {
      env = decodeSingleFrame(rawToBuffer(data), this.receiveLimit);
    } catch (e) {
      const err = toBlocksnapError(e, 'E_FRAME_MALFORMED');
      this.fail(err, closeCodeFor(err));
      return;
    }
    this.deliver(env);
  }

  private socketError(err: Error & { code?: string }): void {
    // ws reports invalid WebSocket frames here, then closes the socket itself.
    if (err.code === 'WS_ERR_UNSUPPORTED_MESSAGE_LENGTH') {
      this.failure ??= new BlocksnapError('E_FRAME_TOO_LARGE', `message from ${this.remote} exceeds the ${this.maxFrameBytes} byte frame limit`, { cause: err });
    } else if (err.code?.startsWith('WS_ERR_')) {
      this.failure ??= new BlocksnapError('E_FRAME_MALFORMED', `invalid WebSocket frame from ${this.remote}: ${err.message}`, { cause: err });
    } else {
      this.failure ??= new BlocksnapError('E_DISCONNECTED', `connection to ${this.remote} failed: ${err.message}`, { cause: err });
    }
  }

  private socketClosed(code: number, reason: string): void {
    const byUs = this.closing;
    this.closing = true;
    if (this.failure) return this.finish(this.failure);
    if (byUs || code === CloseCode.NORMAL) return this.finish();
    this.finish(new BlocksnapError('E_DISCONNECTED', `connection closed by ${this.remote}: ${code}${reason ? ` ${reason}` : ''}`));
  }
}

const takeLargeFrame = (n: number) => largeFrames.take(n);

function rawToBuffer(data: RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  return Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data); // ArrayBuffer: a view, no copy
}

/** Wraps a socket a `WebSocketServer` (created with wsServerOptions) accepted. */
export function wrapServerSocket(ws: WebSocket, req: IncomingMessage, opts: WsTransportOptions & { preAuth?: PreAuthOptions } = {}): Transport {
  const remote = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
  const preAuth = opts.preAuth ? { socket: req.socket, maxBytes: opts.preAuth.maxBytes } : undefined;
  return new WsTransport(ws, remote, opts.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES, preAuth);
}

/**
 * Refuses (E_CONFIG) a plain ws:// URL to anything but a loopback address
 * unless `insecure`: over ws:// the backup data and the session travel in
 * cleartext and an on-path attacker can take over an authenticated session
 * (SCRAM protects the secret, not the channel). A host name other than
 * `localhost` counts as remote: what it resolves to is not known here.
 */
export function checkApplianceUrl(url: string, insecure = false): void {
  let u: URL;
  try {
    u = new URL(url);
  } catch (e) {
    throw new BlocksnapError('E_CONFIG', `appliance URL ${JSON.stringify(url)} is not a URL`, { cause: e });
  }
  if (u.protocol === 'wss:' || insecure) return;
  if (u.protocol !== 'ws:') throw new BlocksnapError('E_CONFIG', `appliance URL ${url} must be ws:// or wss://`);
  if (isLoopbackHost(u.hostname)) return;
  throw new BlocksnapError('E_CONFIG', `appliance URL ${url}: plain ws:// to a non-loopback address sends backup data in cleartext; ` +
    'use wss:// (the appliance\'s --tls-cert/--tls-key, the agent\'s caFile), or accept the risk with "insecure": true in the agent config (or --insecure)');
}

function isLoopbackHost(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  return h === 'localhost' || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h) || /^::ffff:7f[0-9a-f]{2}:/.test(h);
}

/** Dials an appliance; rejects with E_DISCONNECTED if the handshake fails, E_CONFIG for a refused ws:// URL (checkApplianceUrl). */
export function connectWs(
  url: string,
  opts: WsTransportOptions & { headers?: Record<string, string>; handshakeTimeoutMs?: number; ca?: Buffer; insecure?: boolean } = {},
): Promise<Transport> {
  try {
    checkApplianceUrl(url, opts.insecure);
  } catch (e) {
    return Promise.reject(e);
  }
  const maxFrameBytes = opts.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, {
      ...wsServerOptions(maxFrameBytes),
      headers: opts.headers,
      handshakeTimeout: opts.handshakeTimeoutMs ?? 10_000,
      // An all-zero mask: RFC 6455 masking protects browser-originated frames
      // from cache-poisoning proxies; the agent is no browser, and masking
      // costs a pass over every byte on both sides (a second per GB here).
      // ws skips masking and unmasking for a zero mask.
      generateMask: () => {},
      // wss://: the appliance's certificate must verify (against `ca` if given, else the system roots).
      ...(opts.ca ? { ca: opts.ca } : {}),
    });
    // Listeners are attached before 'open' so no early message is lost.
    const transport = new WsTransport(ws, new URL(url).host, maxFrameBytes);
    ws.once('open', () => resolve(transport));
    ws.once('error', (err) => reject(new BlocksnapError('E_DISCONNECTED', `cannot connect to ${url}: ${err.message}`, { cause: err })));
  });
}

/**
 * A listening WebSocket endpoint (own HTTP server, or an existing one given
 * as `server`) that hands every accepted connection over as a Transport.
 */
export class WsTransportServer {
  private readonly transports = new Set<WebSocket>();

  private constructor(
    private readonly http: Server,
    private readonly ownsHttp: boolean,
    private readonly wss: WebSocketServer,
    private readonly path: string,
    private readonly scheme: 'ws' | 'wss' = 'ws',
  ) {}

  static async listen(
    opts: WsTransportOptions & { host?: string; port?: number; path?: string; server?: Server; tls?: { cert: Buffer; key: Buffer }; preAuth?: PreAuthOptions },
    onTransport: (t: Transport, req: IncomingMessage) => void,
  ): Promise<WsTransportServer> {
    const path = opts.path ?? AGENT_PATH;
    const upgradeOnly = (_req: IncomingMessage, res: import('node:http').ServerResponse) => res.writeHead(426).end();
    const http = opts.server ?? (opts.tls ? createHttpsServer({ cert: opts.tls.cert, key: opts.tls.key }, upgradeOnly) : createServer(upgradeOnly));
    const admit = opts.preAuth?.admit;
    const wss = new WebSocketServer({
      server: http, path, ...wsServerOptions(opts.maxFrameBytes),
      // Called (and answered) synchronously inside the upgrade, so a count the caller keeps stays exact.
      ...(admit ? {
        verifyClient: (info: { req: IncomingMessage }, cb: (ok: boolean, code?: number, message?: string) => void) => {
          const refused = admit(info.req);
          cb(!refused, refused?.status, refused?.reason);
        },
      } : {}),
    });
    const srv = new WsTransportServer(http, !opts.server, wss, path, opts.tls ? 'wss' : 'ws');
    const onSocket = opts.preAuth?.onSocket;
    if (onSocket) {
      http.on('connection', (socket: Socket) => {
        if (!onSocket(socket)) socket.destroy();
      });
    }
    wss.on('connection', (ws, req) => {
      srv.transports.add(ws);
      ws.once('close', () => srv.transports.delete(ws));
      onTransport(wrapServerSocket(ws, req, opts), req);
    });
    if (!opts.server) {
      // ws re-emits the HTTP server's 'error' (EADDRINUSE…) on the WebSocketServer: without a
      // listener that is an uncaught exception; the listen promise below reports it instead.
      const ignore = () => undefined;
      wss.on('error', ignore);
      await new Promise<void>((resolve, reject) => {
        http.once('error', reject);
        http.listen(opts.port ?? 0, opts.host ?? '127.0.0.1', () => resolve());
      }).catch((e) => {
        wss.close();
        throw e;
      });
      wss.off('error', ignore);
    }
    return srv;
  }

  get port(): number {
    return (this.http.address() as AddressInfo).port;
  }

  get url(): string {
    const a = this.http.address() as AddressInfo;
    const host = a.family === 'IPv6' ? `[${a.address}]` : a.address;
    return `${this.scheme}://${host}:${a.port}${this.path}`;
  }

  /** Closes every connection (1001), then stops listening. */
  async close(graceMs = 2000): Promise<void> {
    for (const ws of this.transports) ws.close(CloseCode.GOING_AWAY, 'server shutting down');
    const timer = setTimeout(() => this.transports.forEach((ws) => ws.terminate()), graceMs);
    timer.unref();
    try {
      // ws calls back once every client connection is gone.
      await new Promise<void>((resolve) => this.wss.close(() => resolve()));
      if (this.ownsHttp) await new Promise<void>((resolve) => this.http.close(() => resolve()));
    } finally {
      clearTimeout(timer);
    }
  }
}
