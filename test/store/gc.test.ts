/**
 * Garbage collection over a changing volume (issue 11): 100 images, pruned to
 * the last 10, then GC: the store holds what the 10 need (within the rewrite
 * threshold), each verifies clean and exports byte-identical to its volume.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { exportImage } from '../../appliance/ops/export-image.js';
import { verifyImage } from '../../appliance/ops/verify-image.js';
import { StoreRig, neededBytes } from '../../appliance/retention/store-rig.js';
import { makeVolume, mutateVolume, type TestVolume } from '../../appliance/testing/scripted-agent.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';

const CHUNK = 4096;
const CHUNKS = 64;

describe('gc after prune of a changing volume', () => {
  const tmp = new TempDirs();
  let rig: StoreRig;
  const versions: { imageId: string; volume: TestVolume }[] = [];

  beforeAll(async () => {
    rig = await StoreRig.open(await tmp.make('blocksnap-gc-'), { targetPackSize: 64 * 1024 });
    let v = makeVolume('pgdata', CHUNK * CHUNKS, CHUNK, [60, 61, 62, 63]);
    let seed = 1;
    for (let n = 0; n < 100; n++) {
      const changed = n === 0 ? undefined : Array.from(new Set(Array.from({ length: 6 }, () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % 56))).sort((a, b) => a - b);
      if (changed) v = mutateVolume(v, changed);
      const m = await rig.commit(v, changed);
      versions.push({ imageId: m.imageId, volume: v });
    }
  }, 120_000);

  afterAll(async () => {
    await rig?.close();
    await tmp.cleanup();
  });

  it('prunes to the last 10, then GC leaves what the 10 need (within the 50 % rewrite threshold), each verifies and exports byte-identical', async () => {
    const before = rig.store.stats();
    const pr = await rig.retention.prune({ keep: { last: 10 } });
    expect(pr.removed).toHaveLength(90);
    const kept = versions.slice(-10);
    expect(rig.catalog.listImages().map((i) => i.id)).toEqual(kept.map((k) => k.imageId));

    const dry = await rig.retention.gc({ dryRun: true });
    expect(rig.store.stats()).toEqual(before); // a dry run changes nothing
    const gc = await rig.retention.gc({});
    expect(gc.reclaimableBytes).toBe(dry.reclaimableBytes);
    expect(gc.packsDeleted + gc.packsRewritten).toBeGreaterThan(0);
    const after = rig.store.stats();
    const needed = await neededBytes(rig.store, rig.catalog.listImages().map((i) => i.rootDigest));
    expect(gc.liveBytes).toBe(needed);
    // Every pack kept holds ≥ 50 % live bytes, so the store is at most twice what is needed, and
    // never less: pack headers, trailers and footers are the only other bytes.
    expect(after.bytes).toBeGreaterThanOrEqual(needed);
    expect(after.bytes).toBeLessThanOrEqual(2 * needed + after.packs * 200 + after.blobs * 56);
    expect(after.bytes).toBeLessThan(before.bytes / 3);
    expect(after.bytes).toBe(gc.bytesAfter);

    const again = await rig.retention.gc({}); // a second GC finds nothing to do
    expect(again.packsDeleted + again.packsRewritten).toBe(0);
    expect(again.reclaimedBytes).toBe(0);

    for (const k of kept) {
      const img = rig.catalog.image(k.imageId)!;
      const r = await verifyImage(rig.store, rig.manifests, img.id, img.rootDigest);
      expect(r.ok, JSON.stringify(r.bad.slice(0, 3))).toBe(true);
      const file = join(rig.dataDir, `${img.id}.raw`);
      await exportImage(rig.store, img.rootDigest, file);
      expect((await readFile(file)).equals(k.volume.data)).toBe(true);
    }

    // The same holds after a restart (the index was changed durably).
    await rig.reopen();
    expect(rig.store.stats()).toEqual(after);
    for (const k of kept) expect((await verifyImage(rig.store, rig.manifests, k.imageId, rig.catalog.image(k.imageId)!.rootDigest)).ok).toBe(true);
  });

  it('reclaims the packs of a failed job whose pending-pack journal was lost (the index rebuilt): garbage only GC can see', async () => {
    const v = makeVolume('lost', 16 * CHUNK, CHUNK);
    const { ingest } = await rig.begin(v, false);
    await StoreRig.send(ingest, v);
    await ingest.flush(); // its packs are durable and journalled as pending
    const packs = rig.store.stats().packs;
    // What an unreadable index.sqlite rebuilt from the packs leaves (DESIGN.md §6.1): no journal.
    const jobPacks = [...rig.store.index.pendingWriters().values()].flatMap((w) => [...w.packs]);
    expect(jobPacks.length).toBeGreaterThan(0);
    for (const w of rig.store.index.pendingWriters().keys()) rig.store.index.forgetWriter(w);
    await rig.reopen(); // the job is gone with the process; start-up finds nothing pending to remove
    expect(rig.store.stats().packs).toBe(packs);
    const gc = await rig.retention.gc({});
    expect(gc.packsDeleted).toBeGreaterThanOrEqual(jobPacks.length);
    for (const p of jobPacks) expect(rig.store.index.hasPack(p)).toBe(false);
    expect(rig.store.stats().packs).toBeLessThan(packs);
    for (const img of rig.catalog.listImages()) expect((await verifyImage(rig.store, rig.manifests, img.id, img.rootDigest)).ok).toBe(true);
  });
});
