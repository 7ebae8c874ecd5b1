import { randomBytes } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { envelope, type Envelope } from '../../proto/messages.js';
import { BufferPool, largeFrames } from '../../proto/shared/buffer-pool.js';
import type { Transport } from '../../proto/transport.js';
import { connectWs, WsTransportServer } from '../../proto/ws-transport.js';

// Large frames in reused buffers (proto/shared/buffer-pool.ts): a fresh ~2 MiB buffer per restore
// batch cost page faults and made V8 run a full GC every ~25-64 MiB on both sides.
describe('BufferPool', () => {
  it('serves sizes in [minBytes, capacity] from reused buffers, others from new ones; takes back only its own', () => {
    const pool = new BufferPool(1 << 20, 1 << 10, 2);
    expect(pool.fits(100)).toBe(false);
    expect(pool.fits(2 << 20)).toBe(false);
    const small = pool.take(100);
    expect(pool.owns(small.buffer)).toBe(false);
    const a = pool.take(4096);
    expect(a.length).toBe(4096);
    expect(pool.owns(a.buffer)).toBe(true);
    pool.give(a.buffer);
    pool.give(a.buffer); // twice: kept once
    pool.give(new ArrayBuffer(1 << 20)); // not the pool's
    const b = pool.take(8192);
    expect(b.buffer).toBe(a.buffer);
    expect(pool.take(8192).buffer).not.toBe(a.buffer);
    expect({ made: pool.made, reused: pool.reused }).toEqual({ made: 2, reused: 1 });
  });
});

describe('ws transport with the frame pool', () => {
  let server: WsTransportServer | undefined;
  const opened: Transport[] = [];
  afterEach(async () => {
    for (const t of opened.splice(0)) t.close();
    await server?.close();
    server = undefined;
  });

  it('a large message is encoded into a pooled buffer, given back once written: five sends reuse one buffer', async () => {
    let serverSide!: Transport;
    const accepted = new Promise<void>((resolve) => {
      void WsTransportServer.listen({ host: '127.0.0.1', port: 0 }, (t) => {
        serverSide = t;
        resolve();
      }).then((s) => (server = s));
    });
    while (!server) await new Promise((r) => setImmediate(r));
    const client = await connectWs(server.url);
    opened.push(client);
    await accepted;
    opened.push(serverSide);
    const received: Envelope[] = [];
    client.onMessage((e) => received.push(e));
    // 20 chunks of 64 KiB: one ~1.3 MiB message.
    const chunks = Array.from({ length: 20 }, (_, i) => ({ index: i, digest: randomBytes(32), zero: false, data: randomBytes(64 << 10), plainLength: 64 << 10 }));
    const made0 = largeFrames.made;
    const reused0 = largeFrames.reused;
    for (let round = 1; round <= 5; round++) {
      await serverSide.send(envelope('restoreChunks', { requestId: 'rst-0123456789abcdef', seq: round, chunks }));
      const deadline = Date.now() + 30_000;
      while (received.length < round && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
      const env = received[round - 1];
      if (env?.kind !== 'restoreChunks') throw new Error(`round ${round}: got ${env?.kind}`);
      expect(env.restoreChunks.seq).toBe(round);
      expect(env.restoreChunks.chunks.map((c) => Buffer.from(c.data).equals(chunks[c.index]!.data))).toEqual(chunks.map(() => true));
    }
    // Without the pool each send made a new buffer (and V8 a full GC every few MiB of them).
    expect(largeFrames.made - made0).toBeLessThanOrEqual(1);
    expect(largeFrames.reused - reused0).toBeGreaterThanOrEqual(4);
  });
});
