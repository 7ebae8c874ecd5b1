/**
 * Hostile WebSocket clients for the resource-bound tests (DESIGN.md §4.2):
 * raw sockets that speak just enough RFC 6455 to hold what an honest client
 * never would (an unfinished 8 MiB message, a frame before Hello, a flood of
 * wrong proofs), from a chosen loopback source address (127.0.0.0/8 all
 * reaches lo on Linux), so per-source limits can be told from global ones.
 */
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { encodeFrame } from '../../proto/codec.js';
import { envelope, PROTOCOL_VERSION } from '../../proto/messages.js';

export interface RawWs {
  socket: net.Socket;
  /** Bytes the server sent after the 101 (close frames, errors). */
  received: Buffer[];
  closed: Promise<void>;
}

export const REFUSED_AT_ACCEPT = 'connection closed before the upgrade answer';

/** The appliance refused the connection: at the TCP accept, or at the upgrade (429/503). */
export function isRefusal(e: unknown): boolean {
  const m = (e as Error)?.message ?? '';
  return m === REFUSED_AT_ACCEPT || /^HTTP\/1\.1 (429|503) /.test(m) || /ECONNRESET/.test(m);
}

/**
 * Opens a TCP connection from `localAddress` and performs the WebSocket
 * upgrade by hand. Resolves once the server answered 101; rejects with the
 * HTTP status line otherwise (e.g. "HTTP/1.1 503 ...").
 */
export function rawWebSocket(url: string, localAddress?: string, timeoutMs = 5000): Promise<RawWs> {
  const u = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: u.hostname, port: Number(u.port), ...(localAddress ? { localAddress } : {}) });
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    let head = Buffer.alloc(0);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no upgrade answer within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    // Refused at the TCP accept (a connection bound): closed before any answer.
    socket.once('close', () => {
      clearTimeout(timer);
      reject(new Error(REFUSED_AT_ACCEPT));
    });
    socket.once('connect', () => {
      socket.write(`GET ${u.pathname} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
    });
    const onData = (d: Buffer) => {
      head = Buffer.concat([head, d]);
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      socket.off('data', onData);
      clearTimeout(timer);
      const status = head.subarray(0, head.indexOf('\r\n')).toString();
      if (!/^HTTP\/1\.1 101 /.test(status)) {
        socket.destroy();
        return reject(new Error(status));
      }
      const received: Buffer[] = [Buffer.from(head.subarray(end + 4))];
      socket.on('data', (b: Buffer) => received.push(b));
      resolve({ socket, received, closed });
    };
    socket.on('data', onData);
  });
}

/** The header of a masked (zero mask) binary client frame of `len` payload bytes. */
export function clientFrameHeader(len: number): Buffer {
  const h = Buffer.alloc(14);
  h[0] = 0x82; // FIN + binary
  h[1] = 0x80 | 127;
  h.writeBigUInt64BE(BigInt(len), 2);
  // bytes 10..13: the all-zero mask (payload bytes go as they are)
  return h;
}

/** A whole masked binary client frame carrying `payload`. */
export function clientFrame(payload: Buffer): Buffer {
  return Buffer.concat([clientFrameHeader(payload.length), payload]);
}

/** Writes `data` and resolves when the kernel took it (or the socket is gone). */
export function writeAll(socket: net.Socket, data: Buffer): Promise<void> {
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve();
    socket.write(data, () => resolve());
  });
}

/** A Hello frame (protocol framing) for `agent`, with a fresh client nonce. */
export function helloFrame(agent: string): Buffer {
  return encodeFrame(envelope('hello', {
    agent, clientNonce: randomBytes(24), protocolVersion: PROTOCOL_VERSION, agentVersion: 'attacker', instanceId: 'ins-attacker', volumes: [],
  }));
}

/** An AuthProof frame with a random (wrong) proof. */
export function wrongProofFrame(): Buffer {
  return encodeFrame(envelope('authProof', { clientProof: randomBytes(32) }));
}

/**
 * One wrong-proof attempt: connect, Hello, wait for the challenge, send a
 * random proof, wait for the close. 'refused' when the upgrade was refused
 * (rate limit or connection limit), 'closed' when the server ended it.
 */
export async function wrongProofAttempt(url: string, agent: string, localAddress?: string): Promise<'closed' | 'refused'> {
  let ws: RawWs;
  try {
    ws = await rawWebSocket(url, localAddress);
  } catch (e) {
    if (isRefusal(e)) return 'refused';
    throw e;
  }
  await writeAll(ws.socket, clientFrame(helloFrame(agent)));
  // The challenge is a small frame; wait for any byte of it, then answer wrongly.
  await new Promise<void>((r) => {
    if (ws.received.some((b) => b.length > 0)) return r();
    ws.socket.once('data', () => r());
    ws.socket.once('close', () => r());
  });
  await writeAll(ws.socket, clientFrame(wrongProofFrame()));
  const t = setTimeout(() => ws.socket.destroy(), 5000);
  await ws.closed;
  clearTimeout(t);
  return 'closed';
}
