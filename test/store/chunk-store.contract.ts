/**
 * The ChunkStore contract (appliance/store/chunk-store.ts), run by each
 * implementation's test file: `chunkStoreContract('fs', makeHarness)`.
 * Run against FsChunkStore (test/store/fs-chunk-store.test.ts) and
 * MemoryChunkStore (test/store/memory-chunk-store.test.ts). What differs:
 * only the crash-recovery cases (pack files, temp area) are fs-only.
 *
 * A harness opens the store over one backing location (again after close,
 * which is how "reopen" and "crash" are tested) and knows how to damage it.
 * Crash hooks are optional: a store without a temp area or pack files skips
 * those cases.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isBlocksnapError } from '../../proto/errors.js';
import { codeOf } from '../support/error-code.js';
import { BLOB_CHUNK, BLOB_PAGE, BLOB_ROOT, ZERO_DIGEST, type BlobLocation, type ChunkStore } from '../../appliance/store/chunk-store.js';
import { compressibleChunk, makeBlob, randomChunk, sha256, zeroChunk, type TestBlob } from '../../appliance/testing/store-fixtures.js';

export interface CrashHooks {
  /** Makes `blobs` durable in a pack the index does not know: a crash between rename and index insert. */
  packWithoutIndex(blobs: TestBlob[]): Promise<string>;
  /** Damages the footer of a pack so it no longer verifies. */
  damageFooter(pack: string): Promise<void>;
  /** Leaves a half-written pack in the temp area, as a killed writer would. */
  leaveTempPack(): Promise<void>;
  /** Names currently in the temp area. */
  tempEntries(): Promise<string[]>;
  /** True if the pack is still where the store reads packs from. */
  packPresent(pack: string): Promise<boolean>;
}

export interface ChunkStoreHarness {
  /** Opens the store over the harness's backing location (again after close). */
  open(): Promise<ChunkStore>;
  /** Flips one byte of a durable blob's stored payload. */
  corruptPayload(loc: BlobLocation, byteIndex?: number): Promise<void>;
  crash?: CrashHooks;
  /** Releases what the harness created (the store must be closed first). */
  destroy(): Promise<void>;
}


export function chunkStoreContract(name: string, makeHarness: () => Promise<ChunkStoreHarness>): void {
  describe(`ChunkStore contract: ${name}`, () => {
    let h: ChunkStoreHarness;
    let store: ChunkStore | undefined;

    const open = async (): Promise<ChunkStore> => (store = await h.open());
    const reopen = async (): Promise<ChunkStore> => {
      await store?.close();
      store = undefined;
      return open();
    };

    beforeEach(async () => {
      h = await makeHarness();
    });
    afterEach(async () => {
      try {
        await store?.close();
      } finally {
        store = undefined;
        await h.destroy();
      }
    });

    it('round-trips every blob type, with and without a compressed form', async () => {
      const s = await open();
      const blobs = [
        makeBlob(compressibleChunk(64 * 1024), BLOB_CHUNK),
        makeBlob(randomChunk(64 * 1024), BLOB_CHUNK),
        makeBlob(randomChunk(1000), BLOB_CHUNK),
        makeBlob(compressibleChunk(32 * 1024), BLOB_PAGE),
        makeBlob(compressibleChunk(72), BLOB_ROOT),
      ];
      const w = s.openWriter();
      for (const [i, b] of blobs.entries()) {
        const r = await w.put(b.type, b.digest, b.plain, i % 2 === 0 ? b.compressed : undefined);
        expect(r.stored).toBe(true);
        expect(r.storedBytes).toBeGreaterThan(0);
        expect(r.storedBytes).toBeLessThanOrEqual(b.plain.length);
      }
      expect(await w.flush()).toBeGreaterThan(0);
      for (const b of blobs) {
        expect((await s.get(b.digest)).equals(b.plain)).toBe(true);
        expect(s.has(b.digest)).toBe(true);
        const loc = s.locate(b.digest)!;
        expect(loc.type).toBe(b.type);
        expect(loc.plainLength).toBe(b.plain.length);
      }
      expect(s.stats().blobs).toBe(blobs.length);
      expect(s.stats().packs).toBeGreaterThanOrEqual(1);
      expect(await w.flush()).toBe(0);
    });

    it('de-duplicates within a writer, across writers and against the index', async () => {
      const s = await open();
      const a = makeBlob(randomChunk(4096));
      const b = makeBlob(randomChunk(4096));
      const w1 = s.openWriter();
      const w2 = s.openWriter();
      expect((await w1.put(1, a.digest, a.plain, a.compressed)).stored).toBe(true);
      expect(await w1.put(1, a.digest, a.plain, a.compressed)).toEqual({ stored: false, storedBytes: 0 });
      expect((await w2.put(1, a.digest, a.plain, a.compressed)).stored).toBe(false);
      expect((await w2.put(1, b.digest, b.plain)).stored).toBe(true);
      await w1.flush();
      await w2.flush();
      const w3 = s.openWriter();
      expect((await w3.put(1, a.digest, a.plain)).stored).toBe(false);
      expect((await w3.put(1, b.digest, b.plain)).stored).toBe(false);
      expect(await w3.flush()).toBe(0);
      expect(s.stats().blobs).toBe(2);
      const again = (await reopen()).openWriter();
      expect((await again.put(1, b.digest, b.plain)).stored).toBe(false);
      await again.abort();
    });

    it('a blob de-duplicated against another writer survives that writer aborting', async () => {
      const s = await open();
      const a = makeBlob(randomChunk(8192));
      const owner = s.openWriter();
      const borrower = s.openWriter();
      expect((await owner.put(1, a.digest, a.plain, a.compressed)).stored).toBe(true);
      expect((await borrower.put(1, a.digest, a.plain, a.compressed)).stored).toBe(false);
      await owner.abort();
      await borrower.flush();
      expect((await s.get(a.digest)).equals(a.plain)).toBe(true);
    });

    it('shows nothing before flush and nothing after abort', async () => {
      const s = await open();
      const a = makeBlob(compressibleChunk(16 * 1024));
      const w = s.openWriter();
      await w.put(1, a.digest, a.plain, a.compressed);
      expect(s.has(a.digest)).toBe(false);
      expect(s.locate(a.digest)).toBeUndefined();
      expect(await codeOf(s.get(a.digest))).toBe('E_NOT_FOUND');
      await w.abort();
      expect(s.has(a.digest)).toBe(false);
      expect(await codeOf(w.put(1, a.digest, a.plain))).toBe('E_STORE_IO');
      if (h.crash) expect(await h.crash.tempEntries()).toEqual([]);
      const w2 = s.openWriter();
      expect((await w2.put(1, a.digest, a.plain)).stored).toBe(true);
      await w2.flush();
      expect(s.has(a.digest)).toBe(true);
      expect(s.stats().blobs).toBe(1);
    });

    it('refuses all-zero payloads and the ZERO digest', async () => {
      const s = await open();
      const w = s.openWriter();
      const zero = zeroChunk(64 * 1024);
      expect(await codeOf(w.put(1, sha256(zero), zero))).toBe('E_STORE_IO');
      const data = randomChunk(100);
      expect(await codeOf(w.put(1, ZERO_DIGEST, data))).toBe('E_STORE_IO');
      await w.flush();
      expect(s.stats().blobs).toBe(0);
      expect(s.has(sha256(zero))).toBe(false);
    });

    it('detects a flipped byte in a stored payload', async () => {
      const s = await open();
      const blobs = [makeBlob(compressibleChunk(64 * 1024)), makeBlob(randomChunk(64 * 1024))];
      const w = s.openWriter();
      for (const b of blobs) await w.put(b.type, b.digest, b.plain, b.compressed);
      await w.flush();
      for (const b of blobs) {
        const loc = s.locate(b.digest)!;
        await h.corruptPayload(loc, Math.floor(loc.storedLength / 2));
        const err = await s.get(b.digest).then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(isBlocksnapError(err, 'E_STORE_CORRUPT')).toBe(true);
        expect((err as Error).message).toContain(loc.pack);
        expect((err as Error).message).toContain(b.digest.toString('hex'));
      }
      expect(await codeOf(s.get(sha256(Buffer.from('never stored'))))).toBe('E_NOT_FOUND');
    });

    it('sees every flushed blob after close and reopen', async () => {
      const s = await open();
      const blobs = Array.from({ length: 40 }, (_, i) => makeBlob(i % 2 ? randomChunk(8192) : compressibleChunk(8192)));
      const w1 = s.openWriter();
      const w2 = s.openWriter();
      await Promise.all(blobs.map((b, i) => (i % 2 ? w1 : w2).put(b.type, b.digest, b.plain, b.compressed)));
      await Promise.all([w1.flush(), w2.flush()]);
      const before = s.stats();
      const s2 = await reopen();
      expect(s2.stats()).toEqual(before);
      for (const b of blobs) expect((await s2.get(b.digest)).equals(b.plain)).toBe(true);
    });

    describe('crash recovery', () => {
      it('indexes at open a durable pack the index never heard of', async (ctx) => {
        if (!h.crash) return ctx.skip();
        const blobs = [makeBlob(randomChunk(4096)), makeBlob(compressibleChunk(4096), BLOB_PAGE)];
        const pack = await h.crash.packWithoutIndex(blobs);
        const s = await open();
        for (const b of blobs) {
          expect(s.locate(b.digest)?.pack).toBe(pack);
          expect((await s.get(b.digest)).equals(b.plain)).toBe(true);
        }
        expect(s.stats().packs).toBe(1);
      });

      it('opens with an unindexed pack whose footer is damaged: that pack is set aside, the others are indexed', async (ctx) => {
        if (!h.crash) return ctx.skip();
        const bad = makeBlob(randomChunk(4096));
        const good = makeBlob(randomChunk(4096));
        const pack = await h.crash.packWithoutIndex([bad]);
        await h.crash.damageFooter(pack);
        await h.crash.packWithoutIndex([good]);
        const s = await open();
        expect(s.has(bad.digest)).toBe(false);
        expect((await s.get(good.digest)).equals(good.plain)).toBe(true);
        expect(await h.crash.packPresent(pack)).toBe(false);
      });

      it('empties the temp area at open', async (ctx) => {
        if (!h.crash) return ctx.skip();
        await h.crash.leaveTempPack();
        expect((await h.crash.tempEntries()).length).toBeGreaterThan(0);
        const s = await open();
        expect(await h.crash.tempEntries()).toEqual([]);
        expect(s.stats().blobs).toBe(0);
      });
    });
  });
}
