import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chunkCountOf, makeVolume, plainOf, ScriptedAgent, sha256, type TestVolume } from '../../appliance/testing/scripted-agent.js';
import type { ChunkStore } from '../../appliance/store/chunk-store.js';
import { envelope } from '../../proto/messages.js';
import { imageRootDigest } from '../../proto/shared/image-root.js';
import { RESTORE_BATCH_PLAIN_BYTES } from '../../proto/shared/restore-protocol.js';
import { zstdDecompress } from '../../proto/shared/zstd.js';
import { startAppliance, type ApplianceHarness } from '../../scripts/lab/appliance-harness.js';

/**
 * The appliance's side of the restore exchange (DESIGN.md §4.6) over a real
 * WebSocket, driven by the scripted agent: the map pages hash to the root,
 * exactly the wanted chunks arrive, each hashing to its digest, and what a client may not ask for
 * is refused with RestoreEnd{!ok}: a range outside the image, a ZERO chunk,
 * another agent's image, a want before the map.
 */
describe('restore protocol: the appliance side', () => {
  let h: ApplianceHarness;
  let db1: ScriptedAgent;
  let v: TestVolume;
  let imageId: string;
  let seq = 0;
  const rid = () => `rst-${(++seq).toString(16).padStart(16, '0')}`;

  beforeAll(async () => {
    h = await startAppliance(['db1', 'db2']);
    // 2000 chunks of 4 KiB: two map pages; chunks 3, 4 and the whole second page but one are zero.
    const zero = [3, 4, ...Array.from({ length: 2000 - 1025 }, (_, k) => 1025 + k)];
    v = makeVolume('vol', 2000 * 4096, 4096, zero);
    db1 = await ScriptedAgent.connect(h.url);
    await db1.login('db1', h.tokens.db1!, [v]);
    const job = h.app.router.startJob('db1', 'vol', 'full');
    const { committed } = await db1.transfer(job.id, v, { batchChunks: 64 });
    imageId = committed.imageId;
  });

  afterAll(async () => {
    await db1?.close();
    await h?.close();
  });

  /** The map of a restore, page messages in order. */
  async function mapOf(agent: ScriptedAgent, requestId: string) {
    const maps = [];
    for (;;) {
      const m = await agent.next('restoreMap');
      expect(m.requestId).toBe(requestId);
      maps.push(m);
      if (m.last) return maps;
    }
  }

  it('sends the map in pages that hash to the image root, then exactly the wanted chunks, and ends on the agent\'s RestoreEnd', async () => {
    const requestId = rid();
    await db1.send(envelope('restoreRequest', { requestId, imageId, changedOnly: false }));
    const maps = await mapOf(db1, requestId);
    const first = maps[0]!;
    expect(first).toMatchObject({ imageId, volume: 'vol', volumeSize: v.size, chunkSize: 4096 });
    const digests = Buffer.alloc(chunkCountOf(v) * 32);
    for (const m of maps) digests.set(m.digests, m.firstIndex * 32);
    expect(imageRootDigest(v.size, 4096, digests).equals(first.rootDigest)).toBe(true);
    expect(Buffer.from(first.rootDigest).toString('hex')).toBe(h.app.catalog.image(imageId)!.rootDigest);
    expect(digests.subarray(3 * 32, 5 * 32).equals(Buffer.alloc(64))).toBe(true);

    await db1.send(envelope('restoreWant', { requestId, ranges: [{ first: 0, count: 3 }, { first: 5, count: 4 }, { first: 1024, count: 1 }], last: true }));
    const got: number[] = [];
    while (got.length < 8) {
      const b = await db1.next('restoreChunks');
      for (const c of b.chunks) {
        const plain = zstdDecompress(c.data, c.plainLength);
        expect(sha256(plain).equals(c.digest)).toBe(true);
        expect(plain.equals(plainOf(v, c.index))).toBe(true);
        got.push(c.index);
      }
      await db1.send(envelope('restoreAck', { requestId, seq: b.seq }));
    }
    expect(got).toEqual([0, 1, 2, 5, 6, 7, 8, 1024]);
    await db1.send(envelope('restoreEnd', { requestId, ok: true, code: '', message: '' }));
    await db1.ping();
    expect(h.app.router.restores.active()).toEqual([]);
  });

  it('reads adjacent blobs with one vectored pack read, and a failing pack read falls back to getStored: the same frames either way', async () => {
    const restores = h.app.router.restores as unknown as { store: ChunkStore };
    const real = restores.store;
    const ranges = [{ first: 0, count: 3 }, { first: 5, count: 20 }, { first: 1024, count: 1 }];
    const wanted = ranges.flatMap((r) => Array.from({ length: r.count }, (_, k) => r.first + k));
    const run = async () => {
      const requestId = rid();
      await db1.send(envelope('restoreRequest', { requestId, imageId, changedOnly: false }));
      await mapOf(db1, requestId);
      await db1.send(envelope('restoreWant', { requestId, ranges, last: true }));
      const got: number[] = [];
      while (got.length < wanted.length) {
        const b = await db1.next('restoreChunks');
        for (const c of b.chunks) {
          expect(zstdDecompress(c.data, c.plainLength).equals(plainOf(v, c.index))).toBe(true);
          got.push(c.index);
        }
        await db1.send(envelope('restoreAck', { requestId, seq: b.seq }));
      }
      expect(got).toEqual(wanted);
      await db1.send(envelope('restoreEnd', { requestId, ok: true, code: '', message: '' }));
      await db1.ping();
    };
    let reads = 0;
    let fallbacks = 0;
    try {
      restores.store = Object.create(real, {
        readStoredv: { value: (pack: string, offset: number, bufs: Uint8Array[]) => (reads++, real.readStoredv!(pack, offset, bufs)) },
        getStored: { value: (d: Buffer) => (fallbacks++, real.getStored!(d)) },
      });
      await run();
      // 24 chunks in 3 runs of consecutive indexes, stored back to back by the full backup.
      expect(reads).toBeGreaterThan(0);
      expect(reads).toBeLessThanOrEqual(3);
      expect(fallbacks).toBe(0);
      // GC moved the blobs (the pack read fails): each chunk is read again by getStored, which retries.
      restores.store = Object.create(real, {
        readStoredv: { value: async () => { throw new Error('ENOENT: pack removed'); } },
        getStored: { value: (d: Buffer) => (fallbacks++, real.getStored!(d)) },
      });
      await run();
      expect(fallbacks).toBe(wanted.length);
    } finally {
      restores.store = real;
    }
  });

  it.each([
    ['a range past the image', [{ first: 1990, count: 20 }], 'E_CHUNK_RANGE', /outside the image/],
    ['a ZERO chunk', [{ first: 3, count: 1 }], 'E_CHUNK_RANGE', /ZERO in the image/],
  ])('refuses %s with RestoreEnd{E_CHUNK_RANGE} and keeps the session', async (_what, ranges, code, why) => {
    const requestId = rid();
    await db1.send(envelope('restoreRequest', { requestId, imageId, changedOnly: false }));
    await mapOf(db1, requestId);
    await db1.send(envelope('restoreWant', { requestId, ranges, last: true }));
    const end = await db1.next('restoreEnd');
    expect(end).toMatchObject({ requestId, ok: false, code });
    expect(end.message).toMatch(why);
    await db1.ping(); // the session is still up
  });

  it('answers another agent\'s image like a missing one (E_NOT_FOUND), and a want of an unknown restore E_UNKNOWN_JOB', async () => {
    const db2 = await ScriptedAgent.connect(h.url);
    try {
      await db2.login('db2', h.tokens.db2!, []);
      const requestId = rid();
      await db2.send(envelope('restoreRequest', { requestId, imageId, changedOnly: false }));
      expect(await db2.next('restoreEnd')).toMatchObject({ requestId, ok: false, code: 'E_NOT_FOUND' });
      await db2.send(envelope('restoreWant', { requestId: rid(), ranges: [{ first: 0, count: 1 }], last: true }));
      expect(await db2.next('restoreEnd')).toMatchObject({ ok: false, code: 'E_UNKNOWN_JOB' });
    } finally {
      await db2.close();
    }
  });

  it('closes a batch of compressible chunks at RESTORE_BATCH_PLAIN_BYTES of plain data, so the agent\'s worker decompresses it once', async () => {
    // 600 distinct 64 KiB chunks that compress to a few dozen bytes each (37.5 MiB plain): before the plain
    // cap the first batch took all of them (≈ 20 KB of frames, under RESTORE_BATCH_BYTES), above the
    // worker's 64 MiB keep limit at scale — pgbench batches held up to 70 MiB and were decompressed twice.
    const cs = 65536;
    const n = 600;
    const zv: TestVolume = { name: 'zvol', size: n * cs, chunkSize: cs, data: Buffer.alloc(n * cs) };
    for (let i = 0; i < n; i++) plainOf(zv, i).writeUInt32LE(i + 1, 0);
    const db2 = await ScriptedAgent.connect(h.url);
    try {
      await db2.login('db2', h.tokens.db2!, [zv]);
      const job = h.app.router.startJob('db2', 'zvol', 'full');
      const { committed } = await db2.transfer(job.id, zv, { batchChunks: 64 });
      const requestId = rid();
      await db2.send(envelope('restoreRequest', { requestId, imageId: committed.imageId, changedOnly: false }));
      await mapOf(db2, requestId);
      await db2.send(envelope('restoreWant', { requestId, ranges: [{ first: 0, count: n }], last: true }));
      const plainPerBatch: number[] = [];
      let got = 0;
      while (got < n) {
        const b = await db2.next('restoreChunks');
        let plain = 0;
        for (const c of b.chunks) {
          expect(zstdDecompress(c.data, c.plainLength).equals(plainOf(zv, c.index))).toBe(true);
          plain += c.plainLength;
        }
        got += b.chunks.length;
        plainPerBatch.push(plain);
        await db2.send(envelope('restoreAck', { requestId, seq: b.seq }));
      }
      expect(got).toBe(n);
      expect(plainPerBatch.length).toBeGreaterThan(1);
      for (const p of plainPerBatch) expect(p).toBeLessThanOrEqual(RESTORE_BATCH_PLAIN_BYTES + cs);
      await db2.send(envelope('restoreEnd', { requestId, ok: true, code: '', message: '' }));
      await db2.ping();
    } finally {
      await db2.close();
    }
  });

  it('a malformed restore frame (bad request id, overlapping ranges) ends the session like any invalid frame', async () => {
    const other = await ScriptedAgent.connect(h.url);
    try {
      await other.login('db1', h.tokens.db1!, [v]);
      await other.send(envelope('restoreWant', { requestId: rid(), ranges: [{ first: 5, count: 3 }, { first: 6, count: 1 }], last: true }));
      const err = await other.next('error');
      expect(err.code).toBe('E_PROTOCOL');
      expect(err.message).toMatch(/not increasing and disjoint/);
    } finally {
      await other.close();
    }
  });
});
