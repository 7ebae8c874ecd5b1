import { afterEach, describe, expect, it } from 'vitest';
import { DEFAULT_MAX_FRAME_BYTES } from '../../proto/codec.js';
import type { BlocksnapError } from '../../proto/errors.js';
import { envelope, type Envelope } from '../../proto/messages.js';
import type { Transport } from '../../proto/transport.js';
import { memoryTransportPair } from '../../proto/testing/memory-transport.js';
import { sampleBatch, sampleEnvelopes } from '../../proto/testing/sample-envelopes.js';
import { connectWs, WsTransportServer } from '../../proto/ws-transport.js';

/**
 * The Transport contract (proto/transport.ts), written once and run against
 * the WebSocket transport over 127.0.0.1 and the in-memory pair.
 */

interface Pair { a: Transport; b: Transport; cleanup(): Promise<void> }
type Limits = { maxA?: number; maxB?: number };

async function wsPair({ maxA, maxB }: Limits = {}): Promise<Pair> {
  let accept!: (t: Transport) => void;
  const accepted = new Promise<Transport>((r) => (accept = r));
  const server = await WsTransportServer.listen({ host: '127.0.0.1', port: 0, maxFrameBytes: maxB }, (t) => accept(t));
  try {
    const a = await connectWs(server.url, { maxFrameBytes: maxA });
    return { a, b: await accepted, cleanup: () => (a.close(), server.close()) };
  } catch (e) {
    await server.close();
    throw e;
  }
}

async function memoryPair({ maxA = DEFAULT_MAX_FRAME_BYTES, maxB = DEFAULT_MAX_FRAME_BYTES }: Limits = {}): Promise<Pair> {
  const [a, b] = memoryTransportPair({ maxFrameBytes: [maxA, maxB] });
  return { a, b, cleanup: async () => (a.close(), b.close()) };
}

function plain(v: unknown): unknown {
  if (v instanceof Uint8Array) return { bytes: Buffer.from(v).toString('base64') };
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}

function collect(t: Transport, n: number): Promise<Envelope[]> {
  const got: Envelope[] = [];
  return new Promise((resolve) => t.onMessage((e) => (got.push(e), got.length === n && resolve(got))));
}

function closed(t: Transport): Promise<BlocksnapError | undefined> {
  return new Promise((resolve) => t.onClose(resolve));
}

const ping = (nonce: number) => envelope('ping', { nonce });

describe.each([
  ['ws', wsPair],
  ['memory', memoryPair],
])('Transport contract: %s', (_name, makePair) => {
  let pair: Pair | undefined;
  const open = async (limits?: Limits) => (pair = await makePair(limits));
  afterEach(async () => {
    await pair?.cleanup();
    pair = undefined;
  });

  it('delivers envelopes both ways, in order, field for field (4 MiB batch included)', async () => {
    const { a, b } = await open();
    const out = [...sampleEnvelopes(), sampleBatch('job-1', 1, 64), ...sampleEnvelopes()];
    const atB = collect(b, out.length);
    await Promise.all(out.map((e) => a.send(e)));
    expect(plain(await atB)).toEqual(plain(out));
    const back = sampleEnvelopes();
    const atA = collect(a, back.length);
    for (const e of back) await b.send(e);
    expect(plain(await atA)).toEqual(plain(back));
    expect(a.bufferedAmount).toBe(0);
    expect(typeof a.remote === 'string' && a.remote.length > 0).toBe(true);
  });

  it('holds envelopes that arrive before the first onMessage listener', async () => {
    const { a, b } = await open();
    for (let i = 1; i <= 3; i++) await b.send(ping(i));
    await new Promise((r) => setTimeout(r, 50));
    expect(await collect(a, 3)).toEqual([ping(1), ping(2), ping(3)]);
  });

  it('close(): both sides see a clean close and sends fail with E_DISCONNECTED', async () => {
    const { a, b } = await open();
    const [ca, cb] = [closed(a), closed(b)];
    a.close();
    await expect(a.send(ping(1))).rejects.toMatchObject({ code: 'E_DISCONNECTED' });
    expect(await ca).toBeUndefined();
    expect(await cb).toBeUndefined();
    await expect(b.send(ping(2))).rejects.toMatchObject({ code: 'E_DISCONNECTED' });
    a.close(); // idempotent
    expect(await closed(a)).toBeUndefined(); // registered after the close: still called
  });

  it('an abnormal close code reaches the peer as E_DISCONNECTED', async () => {
    const { a, b } = await open();
    const [ca, cb] = [closed(a), closed(b)];
    a.close(4000, 'going to lunch');
    expect(await ca).toBeUndefined();
    const err = await cb;
    expect(err).toMatchObject({ code: 'E_DISCONNECTED' });
    expect(err!.message).toMatch(/4000 going to lunch/);
  });

  it('close() with a code a WebSocket may not send falls back to 1011 and cuts a long reason', async () => {
    const { a, b } = await open();
    const cb = closed(b);
    expect(() => a.close(1006, 'x'.repeat(300))).not.toThrow();
    expect((await cb)!.message).toMatch(/1011 x{100,123}$/);
  });

  it('delivers everything sent before a close ahead of the peer onClose', async () => {
    const { a, b } = await open();
    const order: string[] = [];
    b.onMessage((e) => order.push(e.kind === 'ping' ? `ping ${e.ping.nonce}` : e.kind));
    const cb = closed(b).then(() => order.push('close'));
    const sends = [1, 2, 3, 4, 5].map((n) => a.send(ping(n)));
    a.close();
    await Promise.all(sends);
    await cb;
    expect(order).toEqual(['ping 1', 'ping 2', 'ping 3', 'ping 4', 'ping 5', 'close']);
  });

  it('send rejects an envelope over its limit with E_FRAME_TOO_LARGE and stays open', async () => {
    const { a, b } = await open({ maxA: 64 * 1024, maxB: 64 * 1024 });
    await expect(a.send(sampleBatch('job-1', 1, 2, 65536))).rejects.toMatchObject({ code: 'E_FRAME_TOO_LARGE' });
    const got = collect(b, 1);
    await a.send(ping(5));
    expect(await got).toEqual([ping(5)]);
  });

  it('a frame over the receiver limit closes it with E_FRAME_TOO_LARGE (1009 for the sender)', async () => {
    const { a, b } = await open({ maxB: 64 * 1024 });
    const [ca, cb] = [closed(a), closed(b)];
    const seen: Envelope[] = [];
    b.onMessage((e) => seen.push(e));
    await a.send(sampleBatch('job-1', 1, 2, 65536));
    expect(await cb).toMatchObject({ code: 'E_FRAME_TOO_LARGE' });
    const err = await ca;
    expect(err).toMatchObject({ code: 'E_DISCONNECTED' });
    expect(err!.message).toMatch(/1009/);
    expect(seen).toEqual([]);
  });

  it('a throwing listener closes the transport with E_INTERNAL (1011 for the peer)', async () => {
    const { a, b } = await open();
    const [ca, cb] = [closed(a), closed(b)];
    b.onMessage(() => {
      throw new Error('handler bug');
    });
    await a.send(ping(1));
    const errB = await cb;
    expect(errB).toMatchObject({ code: 'E_INTERNAL' });
    expect(errB!.message).toMatch(/handler bug/);
    expect((await ca)!.message).toMatch(/1011/);
  });
});
