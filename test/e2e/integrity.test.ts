import { existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { RetainingSnapshotProvider } from '../../agent/snapshot/retaining-provider.js';
import { DigestMap, digestMapPath } from '../../agent/state/digest-map.js';
import { compareExportWithSnapshot } from '../support/export-compare.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { ddWrite } from '../support/volume-writes.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { waitFor } from '../support/wait-for.js';

/**
 * Proven commits with a real agent on a real volume (loop devices, XFS
 * reflink pool, ext4, tracefs): the agent's digest map is the one input of
 * an incremental that nothing else checks. When it lies (here: one slot
 * rewritten, the file's own checksum made valid again, as a bug or a restored
 * state directory would leave it), the tracker-driven incremental does not
 * read that chunk, so before the end-to-end root the image committed with the
 * agent believing a map the appliance does not hold. Now the commit is
 * refused (E_INTEGRITY), nothing is visible, the agent drops its maps, and the
 * next job is a full whose export equals its snapshot byte for byte.
 */
describe('end-to-end image root with a real agent', () => {
  let lab: VolumeLab;
  let appl: ApplianceHarness;
  let agent: Agent;
  let keeper: RetainingSnapshotProvider;
  let stateDir: string;
  const fx = e2eFixture();

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1536 << 20, name: 'pgdata' });
    await ddWrite(join(lab.volumeMount, 'base.bin'), { bs: 1 << 20, count: 24 });
    appl = await fx.appliance(['db1']);
    stateDir = join(lab.root, 'agent-state');
    const t = await fx.agent({
      url: appl.url, name: 'db1', token: appl.tokens.db1!, volumes: [lab.volume], stateDir, retainDir: join(lab.poolMount, 'kept'),
    });
    agent = t.agent;
    keeper = t.provider as RetainingSnapshotProvider;
  });

  afterAll(() => fx.dispose());

  /** A job, and its end on both sides: the agent released the volume (snapshot, maps) too. */
  async function run(mode: 'full' | 'incremental') {
    const job = appl.app.router.startJob('db1', 'pgdata', mode);
    const outcome = await job.done;
    await waitFor('the agent to release pgdata', () => !agent.status().volumes[0]!.busy, { detail: () => JSON.stringify(agent.status()) });
    return { job, outcome };
  }

  it('a lying digest map fails the incremental with E_INTEGRITY; the next job is a full equal to its snapshot', async () => {
    const full = await run('full');
    expect(full.outcome, JSON.stringify(full.outcome)).toMatchObject({ ok: true });
    const mapFile = digestMapPath(stateDir, 'pgdata');
    const map = (await DigestMap.readIfValid(mapFile))!;
    expect(map.imageId).toBe(full.outcome.imageId);
    // The last slot (far from where ext4 allocates the new file) now claims content the volume never
    // had; write() makes the file's own checksum valid again.
    map.set(map.chunkCount - 1, Buffer.alloc(32, 0xab));
    await map.write(mapFile);

    await ddWrite(join(lab.volumeMount, 'more.bin'), { bs: 1 << 20, count: 2 });
    const images = appl.app.catalog.listImages({ volume: 'pgdata' }).length;
    const inc = await run('incremental');
    expect(inc.outcome).toMatchObject({ ok: false, errorCode: 'E_INTEGRITY' });
    expect(appl.app.catalog.listImages({ volume: 'pgdata' }).length, 'nothing committed').toBe(images);
    expect(appl.app.catalog.job(inc.job.id)).toMatchObject({ state: 'failed', errorCode: 'E_INTEGRITY', imageId: null });
    expect(existsSync(mapFile), 'the agent dropped the map it could not trust').toBe(false);

    const next = await run('incremental');
    expect(next.outcome, JSON.stringify(next.outcome)).toMatchObject({ ok: true });
    const img = appl.app.catalog.image(next.outcome.imageId!)!;
    expect(img.kind).toBe('full');
    const snap = keeper.kept.get(`pgdata@${next.job.id}`)!;
    const cmp = await compareExportWithSnapshot(appl.app.store, img.rootDigest, snap, lab.poolMount);
    expect(cmp.identical, cmp.detail).toBe(true);
  });

  it('an honest incremental after that commits, its root equal to the agent\'s', async () => {
    await writeFile(join(lab.volumeMount, 'small.txt'), 'x'.repeat(10_000));
    await ddWrite(join(lab.volumeMount, 'more.bin'), { bs: 1 << 20, count: 1, noTruncate: true });
    const inc = await run('incremental');
    expect(inc.outcome, JSON.stringify(inc.outcome)).toMatchObject({ ok: true });
    const img = appl.app.catalog.image(inc.outcome.imageId!)!;
    expect(img.kind).toBe('incremental');
    const snap = keeper.kept.get(`pgdata@${inc.job.id}`)!;
    const cmp = await compareExportWithSnapshot(appl.app.store, img.rootDigest, snap, lab.poolMount);
    expect(cmp.identical, cmp.detail).toBe(true);
  });
});
