/**
 * kill -9 at any point of prune and GC (issue 11): a child process
 * (dist/appliance/retention/gc-crash-child.js) prunes to the last 5 images
 * and collects garbage, and SIGKILLs itself at its K-th durable step, for 20
 * seeded K (after the catalog tombstones, manifest removals, index changes,
 * pack removals, rewritten packs). After each kill: the store reopened as the
 * appliance does at start loses no blob any image still listed needs (every
 * image verifies clean), the 5 newest are all there, and the next GC
 * completes and ends in the same state as a run never killed.
 * Needs `npm run build`.
 */
import { execFile } from 'node:child_process';
import { cp } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { verifyImage } from '../../appliance/ops/verify-image.js';
import { StoreRig } from '../../appliance/retention/store-rig.js';
import { makeVolume, mutateVolume } from '../../appliance/testing/scripted-agent.js';
import { TempDirs } from '../../appliance/testing/store-fixtures.js';

const run = promisify(execFile);
const CHILD = join(process.cwd(), 'dist/appliance/retention/gc-crash-child.js');

async function child(dataDir: string, killAt: number): Promise<{ killed: boolean; out: string }> {
  try {
    const { stdout } = await run(process.execPath, [CHILD, dataDir, 'prune-gc', String(killAt)], { timeout: 60_000 });
    return { killed: false, out: stdout };
  } catch (e) {
    const err = e as { signal?: string; stderr?: string };
    if (err.signal === 'SIGKILL') return { killed: true, out: '' };
    throw new Error(`gc child failed: ${err.stderr ?? String(e)}`);
  }
}

describe('kill -9 during prune and GC', () => {
  const tmp = new TempDirs();
  let base: string;
  let newest: string[] = [];
  let totalSteps = 0;
  let reference: { packs: number; blobs: number; bytes: number };
  let referenceLive = 0;

  beforeAll(async () => {
    base = await tmp.make('blocksnap-gc-crash-');
    const rig = await StoreRig.open(base, { targetPackSize: 64 * 1024 });
    let v = makeVolume('pgdata', 64 * 4096, 4096);
    const ids: string[] = [];
    for (let n = 0; n < 25; n++) {
      const changed = n === 0 ? undefined : [n % 60, (n * 7) % 60, (n * 13 + 1) % 60].filter((x, i, a) => a.indexOf(x) === i).sort((a, b) => a - b);
      if (changed) v = mutateVolume(v, changed);
      ids.push((await rig.commit(v, changed)).imageId);
    }
    await rig.close();
    newest = ids.slice(-5);
    // A run never killed: how many steps there are, and where it ends.
    const ref = await tmp.make('blocksnap-gc-ref-');
    await cp(base, ref, { recursive: true });
    const r = await child(ref, 0);
    totalSteps = JSON.parse(r.out).steps;
    const after = await StoreRig.open(ref, { targetPackSize: 64 * 1024 });
    reference = after.store.stats();
    referenceLive = (await after.retention.gc({ dryRun: true })).liveBytes;
    await after.close();
  }, 120_000);

  afterAll(async () => {
    await tmp.cleanup();
  });

  it('loses no referenced blob at any of 20 seeded kill points, and the next GC finishes the job', async () => {
    expect(totalSteps).toBeGreaterThan(20);
    let seed = 11;
    const points = new Set<number>([1, 2, totalSteps - 1]);
    while (points.size < 20) points.add(1 + ((seed = (seed * 48271) % 2147483647) % (totalSteps - 1)));
    for (const k of [...points].sort((a, b) => a - b)) {
      const dir = await tmp.make(`blocksnap-gc-kill-${k}-`);
      await cp(base, dir, { recursive: true });
      const r = await child(dir, k);
      expect(r.killed, `kill point ${k}`).toBe(true);
      const rig = await StoreRig.open(dir, { targetPackSize: 64 * 1024 });
      try {
        const listed = rig.catalog.listImages();
        for (const id of newest) expect(listed.some((i) => i.id === id), `kill point ${k}: ${id} kept`).toBe(true);
        for (const img of listed) {
          const v = await verifyImage(rig.store, rig.manifests, img.id, img.rootDigest);
          expect(v.ok, `kill point ${k}: ${img.id} ${JSON.stringify([...v.bad.slice(0, 2), ...v.objects])}`).toBe(true);
        }
        // The next run completes: prune again (idempotent) and GC, ending where a run never killed ends.
        await rig.retention.prune({ keep: { last: 5 } });
        await rig.retention.gc({});
        expect(rig.catalog.listImages().map((i) => i.id)).toEqual(newest);
        // Exactly the blobs of a run never killed (no dead blob left, no live one lost); the packs may
        // differ (a GC after a partial one compacts along other lines), within the rewrite threshold.
        const st = rig.store.stats();
        expect(st.blobs, `kill point ${k}`).toBe(reference.blobs);
        expect(st.bytes, `kill point ${k}`).toBeLessThanOrEqual(2 * referenceLive + st.packs * 200 + st.blobs * 56);
        const again = await rig.retention.gc({});
        expect(again.packsDeleted + again.packsRewritten, `kill point ${k}: a further GC has nothing to do`).toBe(0);
        for (const id of newest) expect((await verifyImage(rig.store, rig.manifests, id, rig.catalog.image(id)!.rootDigest)).ok).toBe(true);
      } finally {
        await rig.close();
      }
    }
  }, 240_000);
});
