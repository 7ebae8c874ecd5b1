/**
 * The race between ingest and sweep (issue 11, DESIGN.md §12.3): a job that
 * de-duplicates against exactly the blobs the GC is about to remove. The
 * blobs of a deleted image are dead at the mark; a new backup of the same
 * content hits them in the index — before the GC starts, between mark and
 * sweep, and while a pack is being rewritten. Each time the new image must
 * commit whole (verify clean). With the protocol switched off (the store's
 * hit check stubbed to "never"), the seal refuses (E_INTEGRITY) instead of
 * committing a dangling reference.
 */
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { verifyImage } from '../../appliance/ops/verify-image.js';
import { StoreRig, mutateRigVolume, rigVolume, type RigVolume } from '../../appliance/retention/store-rig.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';
import { codeOf } from '../support/error-code.js';

const CHUNK = 4096;
const CHUNKS = 64;

/** A step hook that stops the GC at `at` until `release()`; `reached` resolves when it got there. */
function pauseAt(at: string) {
  let release!: () => void;
  let reachedResolve!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const reached = new Promise<void>((r) => (reachedResolve = r));
  let done = false;
  return {
    step: async (name: string) => {
      if (name !== at || done) return;
      done = true;
      reachedResolve();
      await gate;
    },
    reached, release: () => release(),
  };
}

describe('GC sweep vs. a job de-duplicating against the blobs it sweeps', () => {
  const tmp = new TempDirs();
  let rig: StoreRig;
  let v1: RigVolume;

  beforeEach(async () => {
    rig = await StoreRig.open(await tmp.make('blocksnap-gc-race-'), { targetPackSize: 4 << 20 });
    v1 = rigVolume('pgdata', CHUNK * CHUNKS, CHUNK);
    const x1 = await rig.commit(v1); // one pack: every chunk, page and root of v1
    await rig.commit(rigVolume('pgdata', CHUNK * CHUNKS, CHUNK)); // unrelated content, now the volume's last image
    await rig.retention.deleteImage(x1.imageId); // v1's blobs are dead from here on
  });

  afterEach(async () => {
    await rig?.close();
    await tmp.cleanup();
  });

  const verifyAll = async () => {
    for (const img of rig.catalog.listImages()) {
      const r = await verifyImage(rig.store, rig.manifests, img.id, img.rootDigest);
      expect(r.ok, `${img.id}: ${JSON.stringify([...r.bad.slice(0, 2), ...r.objects])}`).toBe(true);
    }
  };

  it('a job that hit the dead blobs before the GC began commits whole', async () => {
    const { ingest } = await rig.begin(v1, false);
    await StoreRig.send(ingest, v1); // every chunk a dedup hit on a dead blob
    expect(ingest.stats.chunksStored).toBe(0);
    const gc = await rig.retention.gc({});
    expect(gc.deadBlobs).toBeGreaterThan(0);
    expect(gc.packsKeptForIngest).toBe(1);
    await rig.seal(ingest, v1, null);
    await verifyAll();
  });

  it('a job that hits them between mark and sweep commits whole, and the next GC keeps them for its image', async () => {
    const p = pauseAt('marked');
    rig.retention.deps.step = p.step;
    const gc = rig.retention.gc({});
    await p.reached;
    const { ingest } = await rig.begin(v1, false); // opened inside the GC window
    await StoreRig.send(ingest, v1);
    expect(ingest.stats.chunksStored).toBe(0);
    p.release();
    const r = await gc;
    expect(r.packsKeptForIngest).toBe(1);
    expect(r.packsDeleted).toBe(0);
    await rig.seal(ingest, v1, null);
    await verifyAll();
    rig.retention.deps.step = undefined;
    const next = await rig.retention.gc({});
    expect(next.deadBlobs).toBe(0); // v1's blobs are the new image's now
    await verifyAll();
  });

  it('a job that hits a dead blob while its pack is being rewritten commits whole (the rewrite is abandoned)', async () => {
    // v2 = v1 with 50 of 64 chunks changed, built on a fresh copy of v1: v1's pack keeps 14 live chunks (< 50 %).
    const x1 = await rig.commit(v1);
    const v2 = mutateRigVolume(v1, Array.from({ length: 50 }, (_, i) => i));
    await rig.commit(v2, Array.from({ length: 50 }, (_, i) => i));
    await rig.retention.deleteImage(x1.imageId);
    const p = pauseAt('rewritten-pack-installed');
    rig.retention.deps.step = p.step;
    const gc = rig.retention.gc({});
    await p.reached;
    // A new volume whose first chunk is one of v1's dead chunks (chunk 3: changed in v2).
    const v3 = { ...rigVolume('other', CHUNK * 8, CHUNK) };
    v1.data.subarray(3 * CHUNK, 4 * CHUNK).copy(v3.data, 0);
    const { ingest } = await rig.begin(v3, false);
    await StoreRig.send(ingest, v3);
    expect(ingest.stats.chunksStored).toBe(7); // chunk 0 was a dedup hit
    p.release();
    const r = await gc;
    expect(r.packsKeptForIngest).toBeGreaterThanOrEqual(1);
    await rig.seal(ingest, v3, null);
    await verifyAll();
  });

  it('a blob two jobs stored at once, indexed from the other job\'s pack, counts as hit: its later deleted image takes nothing of the first job\'s', async () => {
    const vw = rigVolume('w', CHUNK * 8, CHUNK);
    const vx = rigVolume('x', CHUNK * 8, CHUNK);
    vw.data.subarray(0, CHUNK).copy(vx.data, 0); // chunk 0 is the same blob B in both
    const w = await rig.begin(vw, false);
    await StoreRig.send(w.ingest, vw, [0]); // B in W's open pack, not yet durable
    const x = await rig.begin(vx, false);
    await StoreRig.send(x.ingest, vx); // X borrows B, then stores its own copy at its flush (W's is not durable yet)
    const ix = await rig.seal(x.ingest, vx, null); // X's pack, with B, is indexed first
    await w.ingest.flush(); // W's copy of B is durable too, but the index keeps reading B from X's pack
    (await rig.begin(vw, false)).ingest.abort(); // a new writer settles X's committed packs: no longer pending
    await rig.retention.deleteImage(ix.imageId); // B is dead to the mark: no listed image needs it
    const gc = await rig.retention.gc({});
    expect(gc.packsKeptForIngest).toBe(1); // X's pack stays: W may reference B through it
    await StoreRig.send(w.ingest, vw, [1, 2, 3, 4, 5, 6, 7]);
    await rig.seal(w.ingest, vw, null);
    await verifyAll();
  });

  it('without the hit check the sweep removes them and the seal refuses the job (E_INTEGRITY), committing nothing', async () => {
    vi.spyOn(rig.store, 'maybeHit').mockReturnValue(false);
    const { ingest } = await rig.begin(v1, false);
    await StoreRig.send(ingest, v1);
    const gc = await rig.retention.gc({});
    expect(gc.packsDeleted).toBe(1);
    const before = rig.catalog.listImages().length;
    expect(await codeOf(rig.seal(ingest, v1, null))).toBe('E_INTEGRITY');
    await ingest.abort();
    expect(rig.catalog.listImages()).toHaveLength(before);
    await verifyAll();
  });
});
