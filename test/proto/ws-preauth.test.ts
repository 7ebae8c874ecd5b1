import { afterEach, describe, expect, it } from 'vitest';
import { clientFrame, clientFrameHeader, rawWebSocket, writeAll } from '../support/attack-clients.js';
import { encodeFrame } from '../../proto/codec.js';
import type { BlocksnapError } from '../../proto/errors.js';
import { envelope, type Envelope } from '../../proto/messages.js';
import type { Transport } from '../../proto/transport.js';
import { checkApplianceUrl, connectWs, WsTransportServer } from '../../proto/ws-transport.js';

const code = (c: string) => expect.objectContaining({ code: c });
const MAX = 8 << 20;
const PRE = 4096;

/** Server transports with a 4 KiB pre-authentication budget; a ping "authenticates" its connection. */
async function serverWithBudget(admit?: () => { status: number; reason: string } | null) {
  const accepted: { t: Transport; got: Envelope[]; closed: Promise<BlocksnapError | undefined> }[] = [];
  const server = await WsTransportServer.listen({ host: '127.0.0.1', port: 0, maxFrameBytes: MAX, preAuth: { maxBytes: PRE, admit } }, (t) => {
    const got: Envelope[] = [];
    t.onMessage((e) => {
      got.push(e);
      if (e.kind === 'ping') t.authenticated?.();
      void t.send(envelope('pong', { nonce: got.length })).catch(() => undefined);
    });
    accepted.push({ t, got, closed: new Promise((r) => t.onClose(r)) });
  });
  return { server, accepted };
}

describe('ws transport: pre-authentication bounds', () => {
  const cleanup: (() => Promise<unknown> | void)[] = [];
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await c();
  });

  it('cuts a peer that holds an unfinished 8 MiB message before authenticating, after the budget, not after 8 MiB', async () => {
    const { server, accepted } = await serverWithBudget();
    cleanup.push(() => server.close());
    const ws = await rawWebSocket(server.url);
    cleanup.push(() => void ws.socket.destroy());
    // Declares 8 MiB, sends 64 KiB of it and keeps the connection open (the landed code buffered it all).
    await writeAll(ws.socket, Buffer.concat([clientFrameHeader(8 << 20), Buffer.alloc(64 << 10)]));
    await ws.closed; // the server destroyed the socket: no close handshake to wait for
    expect(await accepted[0]!.closed).toEqual(code('E_FRAME_TOO_LARGE'));
    // The close frame (1009) went out before the socket was destroyed.
    const bytes = Buffer.concat(ws.received);
    expect(bytes[0]).toBe(0x88);
    expect(bytes.readUInt16BE(2)).toBe(1009);
  });

  it('does not decode a frame above the budget before authentication, even one under maxFrameBytes', async () => {
    const { server, accepted } = await serverWithBudget();
    cleanup.push(() => server.close());
    const ws = await rawWebSocket(server.url);
    cleanup.push(() => void ws.socket.destroy());
    const big = encodeFrame(envelope('cancelJob', { jobId: 'j', reason: 'x'.repeat(5000) }));
    const small = encodeFrame(envelope('cancelJob', { jobId: 'j', reason: 'x'.repeat(100) }));
    await writeAll(ws.socket, clientFrame(small));
    await writeAll(ws.socket, clientFrame(big)); // past the 4 KiB budget, far below maxFrameBytes
    await ws.closed;
    expect(accepted[0]!.got.map((e) => e.kind)).toEqual(['cancelJob']);
    expect(await accepted[0]!.closed).toEqual(code('E_FRAME_TOO_LARGE'));
  });

  it('lifts the budget once the connection authenticated: 1 MiB frames pass', async () => {
    const { server, accepted } = await serverWithBudget();
    cleanup.push(() => server.close());
    const t = await connectWs(server.url, { maxFrameBytes: MAX });
    cleanup.push(() => t.close());
    const pongs: Envelope[] = [];
    t.onMessage((e) => pongs.push(e));
    await t.send(envelope('ping', { nonce: 1 }));
    // Like Welcome: nothing big is sent before the server said the connection is authenticated.
    await expect.poll(() => pongs.length, { timeout: 5000 }).toBe(1);
    for (let i = 0; i < 4; i++) await t.send(envelope('cancelJob', { jobId: 'j', reason: 'y'.repeat(1 << 20) }));
    await expect.poll(() => accepted[0]?.got.length, { timeout: 5000 }).toBe(5);
    await t.send(envelope('ping', { nonce: 2 }));
    await expect.poll(() => pongs.length, { timeout: 5000 }).toBe(6);
  });

  it('admit() refuses the upgrade with its HTTP status before any WebSocket exists', async () => {
    let refuse = true;
    const { server, accepted } = await serverWithBudget(() => (refuse ? { status: 503, reason: 'busy' } : null));
    cleanup.push(() => server.close());
    await expect(rawWebSocket(server.url)).rejects.toThrow(/^HTTP\/1\.1 503 /);
    await expect(connectWs(server.url)).rejects.toThrow(code('E_DISCONNECTED'));
    expect(accepted).toHaveLength(0);
    refuse = false;
    const t = await connectWs(server.url);
    cleanup.push(() => t.close());
    expect(accepted).toHaveLength(1);
  });
});

describe('plain ws:// only to loopback unless insecure', () => {
  it.each(['ws://127.0.0.1:7700/v1/agent', 'ws://127.1.2.3:7700/v1/agent', 'ws://localhost:7700/v1/agent', 'ws://[::1]:7700/v1/agent',
    'wss://10.0.0.5:7700/v1/agent', 'wss://appliance.example:7700/v1/agent'])('%s is allowed', (url) => {
    expect(() => checkApplianceUrl(url)).not.toThrow();
  });

  it.each(['ws://10.0.0.5:7700/v1/agent', 'ws://appliance.example:7700/v1/agent', 'ws://[2001:db8::1]:7700/v1/agent', 'ws://0.0.0.0:7700/'])(
    '%s is a configuration error naming the way out, unless insecure', (url) => {
      expect(() => checkApplianceUrl(url)).toThrow(code('E_CONFIG'));
      expect(() => checkApplianceUrl(url)).toThrow(/wss:\/\/.*"insecure": true/);
      expect(() => checkApplianceUrl(url, true)).not.toThrow();
    });

  it('connectWs refuses such a URL without dialling', async () => {
    await expect(connectWs('ws://192.0.2.1:7700/v1/agent', { handshakeTimeoutMs: 60_000 })).rejects.toThrow(code('E_CONFIG'));
  });
});
