import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { expect, it } from 'vitest';
import { FsManifestStore } from '../../appliance/store/fs-manifest-store.js';
import { buildManifest, manifestPath } from '../../appliance/store/manifest.js';
import { listQuarantine } from '../../appliance/store/quarantine.js';
import { MemoryManifestStore } from '../../appliance/testing/memory-manifest-store.js';
import { manifestStoreContract } from './manifest-store.contract.js';

manifestStoreContract('FsManifestStore', async () => {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'bsn-manifest-store-'));
  const storeDir = path.join(dataDir, 'store');
  return {
    open: async () => new FsManifestStore(storeDir),
    async putRaw(imageId, bytes) {
      await mkdir(path.join(storeDir, 'manifests'), { recursive: true });
      await writeFile(manifestPath(storeDir, imageId), bytes);
    },
    destroy: () => rm(dataDir, { recursive: true, force: true }),
  };
});

manifestStoreContract('MemoryManifestStore', async () => {
  const objects = new Map<string, Buffer>(); // what a reopen sees
  return {
    open: async () => new MemoryManifestStore(objects),
    putRaw: async (imageId, bytes) => void objects.set(imageId, bytes),
    destroy: async () => undefined,
  };
});

it('FsManifestStore quarantines into DATA/quarantine with a record, and leaves no temp behind', async () => {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'bsn-manifest-store-'));
  try {
    const s = new FsManifestStore(path.join(dataDir, 'store'));
    const m = buildManifest({
      agent: 'db1', volume: 'v', volumeSize: 65536, chunkSize: 65536, kind: 'full', basisImageId: null, jobId: 'job-1', rootDigest: 'ab'.repeat(32), stats: {},
    });
    await s.put(m);
    expect(await readdir(path.join(dataDir, 'store', 'tmp'))).toEqual([]);
    const rec = await s.quarantine(m.imageId, 'test');
    expect(rec.from).toBe(`store/manifests/${m.imageId}.json`);
    expect((await listQuarantine(dataDir)).map((r) => r.object)).toEqual([`manifest ${m.imageId}`]);
    expect(await s.list()).toEqual([]);
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
});
