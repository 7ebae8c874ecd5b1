import { createServer } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { WebSocket, WebSocketServer } from 'ws';
import { encodeFrame } from '../../proto/codec.js';
import type { BlocksnapError } from '../../proto/errors.js';
import { envelope, type Envelope } from '../../proto/messages.js';
import type { Transport } from '../../proto/transport.js';
import { connectWs, WsTransportServer } from '../../proto/ws-transport.js';
import { waitFor } from '../support/wait-for.js';

const MAX = 64 * 1024;
const ping = (nonce: number) => envelope('ping', { nonce });
const closed = (t: Transport) => new Promise<BlocksnapError | undefined>((r) => t.onClose(r));

/** A raw ws client: sends whatever we like, reports the close code and reason it gets. */
async function rawClient(url: string): Promise<{ ws: WebSocket; closed: Promise<{ code: number; reason: string }> }> {
  const ws = new WebSocket(url);
  const closedP = new Promise<{ code: number; reason: string }>((r) => ws.on('close', (code, reason) => r({ code, reason: reason.toString() })));
  ws.on('error', () => {}); // a 1009 close may surface as an error on the sender too
  await new Promise((resolve, reject) => (ws.once('open', resolve), ws.once('error', reject)));
  return { ws, closed: closedP };
}

describe('ws transport', () => {
  let server: WsTransportServer;
  const accepted: Transport[] = [];
  const opened: Array<{ close(): void }> = [];

  beforeEach(async () => {
    accepted.length = 0;
    // Echo server: what a connection sends comes back.
    server = await WsTransportServer.listen({ host: '127.0.0.1', port: 0, maxFrameBytes: MAX }, (t) => {
      accepted.push(t);
      t.onMessage((e) => void t.send(e).catch(() => {}));
    });
  });
  afterEach(async () => {
    for (const c of opened.splice(0)) c.close();
    await server.close();
  });

  async function goodClient(): Promise<Transport> {
    const t = await connectWs(server.url, { maxFrameBytes: MAX });
    opened.push(t);
    return t;
  }

  async function roundTrip(t: Transport, nonce: number): Promise<Envelope> {
    const got = new Promise<Envelope>((r) => t.onMessage(r));
    await t.send(ping(nonce));
    return got;
  }

  it('listens on 127.0.0.1 at /v1/agent and names the remote end', async () => {
    expect(server.url).toBe(`ws://127.0.0.1:${server.port}/v1/agent`);
    const t = await goodClient();
    expect(await roundTrip(t, 1)).toEqual(ping(1));
    expect(t.remote).toBe(`127.0.0.1:${server.port}`);
    expect(accepted[0]!.remote).toMatch(/^127\.0\.0\.1:\d+$/);
  });

  it.each<[string, (ws: WebSocket) => void, number, string]>([
    ['a text message', (ws) => ws.send('{"hello":{}}'), 1008, 'E_FRAME_MALFORMED'],
    ['a garbage binary message', (ws) => ws.send(Buffer.from([3, 0, 0, 0, 0xde, 0xad, 0xbe])), 1008, 'E_FRAME_MALFORMED'],
    ['two frames in one message', (ws) => ws.send(Buffer.concat([encodeFrame(ping(1)), encodeFrame(ping(2))])), 1008, 'E_FRAME_MALFORMED'],
    ['an empty envelope', (ws) => ws.send(Buffer.alloc(4)), 1008, 'E_FRAME_MALFORMED'],
    ['a declared length above the limit', (ws) => ws.send(Buffer.from([0, 0, 2, 0, 1, 2])), 1009, 'E_FRAME_TOO_LARGE'],
    ['a message above maxPayload', (ws) => ws.send(Buffer.alloc(MAX + 5)), 1009, 'E_FRAME_TOO_LARGE'],
  ])('%s closes that connection only (close %i, %s)', async (_name, misbehave, closeCode, errCode) => {
    const good = await goodClient();
    expect(await roundTrip(good, 1)).toEqual(ping(1));
    const bad = await rawClient(server.url);
    await waitFor('the server to accept it', () => accepted.length === 2);
    const badServerSide = accepted[1]!;
    const serverErr = closed(badServerSide);
    misbehave(bad.ws);
    const { code, reason } = await bad.closed;
    expect(code).toBe(closeCode);
    expect(await serverErr).toMatchObject({ code: errCode });
    if (code === 1008) expect(reason).toMatch(new RegExp(`^${errCode}: `));
    // The other connection is unaffected.
    const again = new Promise<Envelope>((r) => good.onMessage(r));
    await good.send(ping(2));
    expect(await again).toEqual(ping(2));
  });

  it('a connection dropped without a close handshake is E_DISCONNECTED', async () => {
    const bad = await rawClient(server.url);
    await waitFor('the server to accept it', () => accepted.length === 1);
    const err = closed(accepted[0]!);
    bad.ws.terminate();
    expect(await err).toMatchObject({ code: 'E_DISCONNECTED' });
  });

  it('server close() closes clients with 1001 (E_DISCONNECTED on the client)', async () => {
    const t = await goodClient();
    const err = closed(t);
    await server.close();
    expect((await err)!.message).toMatch(/1001/);
    server = await WsTransportServer.listen({ host: '127.0.0.1', port: 0 }, () => {}); // for afterEach
  });

  it('the client side rejects a text message from the server with 1008', async () => {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    try {
      await new Promise((r) => wss.once('listening', r));
      const serverSaw = new Promise<number>((r) => wss.once('connection', (ws) => (ws.on('close', (c) => r(c)), ws.send('hi'))));
      const t = await connectWs(`ws://127.0.0.1:${(wss.address() as { port: number }).port}/`);
      expect(await closed(t)).toMatchObject({ code: 'E_FRAME_MALFORMED' });
      expect(await serverSaw).toBe(1008);
    } finally {
      for (const c of wss.clients) c.terminate();
      await new Promise((r) => wss.close(r));
    }
  });

  it('connectWs rejects with E_DISCONNECTED when nothing listens or the path is wrong', async () => {
    const probe = createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const port = (probe.address() as { port: number }).port;
    await new Promise((r) => probe.close(r));
    await expect(connectWs(`ws://127.0.0.1:${port}/v1/agent`)).rejects.toMatchObject({ code: 'E_DISCONNECTED' });
    await expect(connectWs(`ws://127.0.0.1:${server.port}/elsewhere`)).rejects.toMatchObject({ code: 'E_DISCONNECTED' });
  });
});
