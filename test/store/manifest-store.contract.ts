/**
 * The ManifestStore contract (appliance/store/manifest-store.ts), run by
 * test/store/manifest-store.test.ts against FsManifestStore and
 * MemoryManifestStore; a later object-store backend is held to it too.
 *
 * A harness opens the store over one backing location (again: a reopen) and
 * can put raw bytes under an id, as damage or a misplaced object would.
 */
import { randomBytes } from 'node:crypto';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { buildManifest, encodeManifest, newImageId, type ManifestFields } from '../../appliance/store/manifest.js';
import type { ManifestStore } from '../../appliance/store/manifest-store.js';

export interface ManifestStoreHarness {
  open(): Promise<ManifestStore>;
  /** Stores `bytes` under `imageId` bypassing the store's checks. */
  putRaw(imageId: string, bytes: Buffer): Promise<void>;
  destroy(): Promise<void>;
}

function fields(over: Partial<ManifestFields> = {}): ManifestFields {
  return {
    agent: 'db1', volume: 'pgdata', volumeSize: 1 << 30, chunkSize: 65536, kind: 'full', basisImageId: null,
    jobId: 'job-1', rootDigest: randomBytes(32).toString('hex'), stats: { chunksStored: 1 }, ...over,
  };
}

export function manifestStoreContract(name: string, makeHarness: () => Promise<ManifestStoreHarness>): void {
  describe(`ManifestStore contract: ${name}`, () => {
    let h: ManifestStoreHarness;
    beforeEach(async () => {
      h = await makeHarness();
    });
    afterEach(async () => {
      await h.destroy();
    });

    it('put is visible to get and list, also after a reopen', async () => {
      const s = await h.open();
      expect(await s.list()).toEqual([]);
      const m = buildManifest(fields());
      await s.put(m);
      expect(await s.get(m.imageId)).toEqual(m);
      expect(await s.list()).toEqual([m.imageId]);
      const again = await h.open();
      expect(await again.get(m.imageId)).toEqual(m);
      expect(await again.list()).toEqual([m.imageId]);
    });

    it('never replaces a stored manifest', async () => {
      const s = await h.open();
      const m = buildManifest(fields());
      await s.put(m);
      await expect(s.put(buildManifest(fields({ imageId: m.imageId, jobId: 'job-2' })))).rejects.toMatchObject({ code: 'E_STORE_IO' });
      expect(await s.get(m.imageId)).toEqual(m);
      expect(await s.list()).toEqual([m.imageId]);
    });

    it('lists ids sorted by creation time', async () => {
      const s = await h.open();
      const ids = ['2024-03-01T00:00:00Z', '2023-12-31T23:59:59Z', '2024-01-02T00:00:00Z'].map((t) => newImageId(new Date(t)));
      for (const imageId of ids) await s.put(buildManifest(fields({ imageId })));
      expect(await s.list()).toEqual([...ids].sort());
    });

    it('get: absent is E_NOT_FOUND, a non-id is E_FORMAT, damage or another image under the id is E_STORE_CORRUPT', async () => {
      const s = await h.open();
      await expect(s.get(newImageId())).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
      await expect(s.get('../x')).rejects.toMatchObject({ code: 'E_FORMAT' });
      const a = buildManifest(fields());
      const b = buildManifest(fields({ jobId: 'job-b' }));
      await h.putRaw(a.imageId, Buffer.from(encodeManifest(a).toString('utf8').replace('"jobId":"job-1"', '"jobId":"job-x"')));
      await expect(s.get(a.imageId)).rejects.toMatchObject({ code: 'E_STORE_CORRUPT' });
      const other = newImageId();
      await h.putRaw(other, encodeManifest(b));
      await expect(s.get(other)).rejects.toMatchObject({ code: 'E_STORE_CORRUPT' });
    });

    it('remove takes a manifest out durably; an absent one is not an error', async () => {
      const s = await h.open();
      const a = buildManifest(fields());
      const b = buildManifest(fields({ jobId: 'job-b' }));
      await s.put(a);
      await s.put(b);
      await s.remove(a.imageId);
      await s.remove(newImageId());
      expect(await s.list()).toEqual([b.imageId]);
      await expect((await h.open()).get(a.imageId)).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
    });

    it('quarantine moves a damaged manifest out of the list and says where', async () => {
      const s = await h.open();
      const good = buildManifest(fields());
      await s.put(good);
      const bad = newImageId();
      await h.putRaw(bad, Buffer.from('{"format":'));
      expect((await s.list()).sort()).toEqual([good.imageId, bad].sort());
      const rec = await s.quarantine(bad, 'does not decode');
      expect(rec).toMatchObject({ object: `manifest ${bad}`, kind: 'manifest', reason: 'does not decode' });
      expect(rec.to).toBeTruthy();
      expect(await (await h.open()).list()).toEqual([good.imageId]);
    });
  });
}
