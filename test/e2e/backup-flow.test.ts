import { execa } from 'execa';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { RetainingSnapshotProvider } from '../../agent/snapshot/retaining-provider.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { compareFiles } from '../support/same-bytes.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { exportImage } from '../../appliance/ops/export-image.js';
import { verifyImage } from '../../appliance/ops/verify-image.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';

/**
 * The whole flow on real parts: an XFS pool and an ext4 volume on loop
 * devices, PostgreSQL 15 with pgbench on it, the appliance and the agent
 * talking over a real WebSocket. Every image is exported and compared byte
 * for byte with the snapshot it came from, and PostgreSQL is started on the
 * exported incremental to prove the data is there.
 */
describe('backup flow: full + incremental of a live PostgreSQL volume', () => {
  let lab: VolumeLab;
  let pg: PgCluster;
  let appl: ApplianceHarness;
  let agent: Agent;
  let keeper: RetainingSnapshotProvider;
  const fx = e2eFixture();

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 768 << 20, poolSize: 3 * 1024 ** 3, name: 'pgdata' });
    pg = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
    await pg.pgbenchInit(5);
    appl = await fx.appliance(['db1']);
    const t = await fx.agent({
      url: appl.url, name: 'db1', token: appl.tokens.db1!, volumes: [lab.volume], stateDir: join(lab.root, 'agent-state'),
      retainDir: join(lab.poolMount, 'kept'),
    });
    agent = t.agent;
    keeper = t.provider as RetainingSnapshotProvider;
  });

  afterAll(() => fx.dispose());

  async function backup(mode: 'full' | 'incremental') {
    const job = appl.app.router.startJob('db1', 'pgdata', mode);
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    return { ...outcome, jobId: job.id };
  }

  async function exportAndCompare(imageId: string, jobId: string) {
    const img = appl.app.catalog.image(imageId)!;
    const out = join(lab.poolMount, `${imageId}.raw`);
    fx.defer(`export ${imageId}`, () => rm(out, { force: true }));
    await exportImage(appl.app.store, img.rootDigest, out);
    const snap = keeper.kept.get(`pgdata@${jobId}`);
    expect(snap, 'kept snapshot').toBeTruthy();
    const cmp = await compareFiles(out, snap!);
    expect(cmp.identical, `export of ${imageId} differs from its snapshot: ${cmp.detail}`).toBe(true);
    return out;
  }

  it('takes a full, then an incremental that sends only changed chunks, both byte-identical to their snapshots', async () => {
    const full = await backup('full');
    const fullImg = appl.app.catalog.image(full.imageId!)!;
    expect(fullImg.kind).toBe('full');
    await exportAndCompare(full.imageId!, full.jobId);

    await pg.pgbench({ transactions: 300, clients: 2 });
    const before = Number((await pg.query<{ n: string }>('select sum(abalance)::text as n from pgbench_accounts'))[0]!.n);
    await pg.query('create table marker(v text)');
    await pg.query(`insert into marker values ('after-full')`);
    await pg.query('checkpoint');

    const inc = await backup('incremental');
    const incImg = appl.app.catalog.image(inc.imageId!)!;
    expect(incImg.kind).toBe('incremental');
    expect(incImg.basisImageId).toBe(full.imageId);
    const stats = appl.app.catalog.job(inc.jobId)!.stats as Record<string, number>;
    expect(stats.chunksSent).toBeGreaterThan(0);
    // The kernel tracker chose what to read: far less than the volume.
    expect(stats.changeSource).toBe('tracker');
    expect(stats.chunksRead).toBeLessThan(stats.chunksTotal / 4);
    // Only what changed travels: a few % of the volume after 300 transactions.
    expect(stats.chunksSent).toBeLessThan(stats.chunksTotal / 4);
    expect(stats.pagesShared).toBeGreaterThanOrEqual(0);
    const raw = await exportAndCompare(inc.imageId!, inc.jobId);

    const v = await verifyImage(appl.app.store, appl.app.manifests, inc.imageId!, incImg.rootDigest);
    expect(v.ok).toBe(true);
    expect(v.chunksChecked).toBeGreaterThan(0);

    // Recoverability: start PostgreSQL on the exported incremental.
    const dev = await attachLoop(raw);
    fx.defer('restored loop device', () => detachLoop(dev));
    const mnt = join(lab.root, 'restored');
    await mkdir(mnt, { recursive: true });
    await execa('mount', ['-t', 'ext4', '-o', 'noatime', dev, mnt]);
    fx.defer('restored mount', () => execa('umount', [mnt]));
    await rm(join(mnt, 'pg', 'postmaster.pid'), { force: true });
    const restored = new PgCluster({ dataDir: join(mnt, 'pg') });
    fx.add('restored PostgreSQL', restored, (r) => r.destroy());
    await restored.start();
    const rows = await restored.query<{ v: string }>('select v from marker');
    expect(rows.map((r) => r.v)).toEqual(['after-full']);
    const sum = Number((await restored.query<{ n: string }>('select sum(abalance)::text as n from pgbench_accounts'))[0]!.n);
    expect(sum).toBe(before);
    await restored.stop();
  });

  it('audits the tracker against a full comparison after more work: 0 missed chunks', async () => {
    await pg.pgbench({ transactions: 200, clients: 2 });
    await pg.query('vacuum full pgbench_history');
    await pg.query('checkpoint');
    const a = appl.app.router.startJob('db1', 'pgdata', 'incremental', { audit: true });
    const outcome = await a.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    const st = appl.app.catalog.job(a.id)!.stats as Record<string, unknown>;
    expect(st.audited).toBe(true);
    expect(st.auditChanged).toBeGreaterThan(0);
    expect(st.auditMissed).toBe(0);
    await exportAndCompare(outcome.imageId!, a.id);
  });

  it('refuses a stale basis and turns the job into a full', async () => {
    // Another image committed behind the agent's back makes its local basis stale.
    const j = await backup('incremental');
    const last = appl.app.catalog.image(j.imageId!)!;
    appl.app.catalog.insertImage({
      id: 'img-20990101t000000z-deadbeef', agent: 'db1', volume: 'pgdata', jobId: null, kind: 'full', basisImageId: null,
      rootDigest: last.rootDigest, volumeSize: last.volumeSize, chunkSize: last.chunkSize, createdAt: '2099-01-01T00:00:00.000Z',
    });
    const next = await backup('incremental');
    const img = appl.app.catalog.image(next.imageId!)!;
    expect(img.kind).toBe('full');
    const st = appl.app.catalog.job(next.jobId)!.stats as Record<string, unknown>;
    expect(String(st.fallbackReason)).toMatch(/refused the basis/);
  });
});
