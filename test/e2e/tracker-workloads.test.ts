import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { RetainingSnapshotProvider } from '../../agent/snapshot/retaining-provider.js';
import { compareExportWithSnapshot } from '../support/export-compare.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { ddWrite, fstrim } from '../support/volume-writes.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { createLogger } from '../../proto/shared/log.js';
import { e2eFixture } from '../support/e2e-fixture.js';

/**
 * The kernel tracker against real workloads on a live PostgreSQL 15 volume:
 * after each workload an audited incremental reads the whole snapshot,
 * compares every chunk's digest with the basis and checks that the tracker
 * had marked every chunk that really changed (0 missed). Every image is
 * exported and compared byte for byte with the snapshot it was taken from.
 * Plain incrementals in between read only what the tracker marked and must
 * be byte-identical too: that is the path production takes.
 */
type Stats = Record<string, unknown> & { changeSource: string; fallbackReason: string };

describe('tracker: 0 missed chunks under PostgreSQL and filesystem workloads', () => {
  const fx = e2eFixture();
  let lab: VolumeLab;
  let pg: PgCluster;
  let appl: ApplianceHarness;
  let agent: Agent;
  let keeper: RetainingSnapshotProvider;
  const seen: Record<string, unknown>[] = [];

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 512 << 20, poolSize: 3 * 1024 ** 3, name: 'pgdata' });
    pg = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
    await pg.pgbenchInit(5);
    // No scheduled audits: this file decides which incremental is audited.
    appl = await fx.appliance(['db1'], { auditEvery: 0 });
    const log = createLogger('test-agent', process.env.BLOCKSNAP_LOG ?? 'warn');
    const t = await fx.agent({
      url: appl.url, name: 'db1', token: appl.tokens.db1!, volumes: [lab.volume], stateDir: join(lab.root, 'agent-state'),
      retainDir: join(lab.poolMount, 'kept'), log,
    });
    expect(t.agent.config.tracking).toBe('tracefs');
    agent = t.agent;
    keeper = t.provider as RetainingSnapshotProvider;
  });

  afterAll(async () => {
    if (seen.length) console.table(seen);
    await fx.dispose();
  });

  async function backup(mode: 'full' | 'incremental', audit = false): Promise<{ jobId: string; imageId: string; stats: Stats }> {
    const job = appl.app.router.startJob('db1', 'pgdata', mode, { audit });
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    const stats = appl.app.catalog.job(job.id)!.stats as Stats;
    await expectIdentical(outcome.imageId!, job.id);
    return { jobId: job.id, imageId: outcome.imageId!, stats };
  }

  async function expectIdentical(imageId: string, jobId: string): Promise<void> {
    const img = appl.app.catalog.image(imageId)!;
    const snap = keeper.kept.get(`pgdata@${jobId}`);
    expect(snap, 'retained snapshot').toBeTruthy();
    const cmp = await compareExportWithSnapshot(appl.app.store, img.rootDigest, snap!, lab.poolMount);
    expect(cmp.identical, `export of ${imageId} differs from its snapshot: ${cmp.detail}`).toBe(true);
    // Keep the pool small: the retained clone diverges from the live volume.
    await rm(snap!, { force: true });
    keeper.kept.delete(`pgdata@${jobId}`);
  }

  /** An audited incremental after `workload`: the tracker covered every changed chunk. */
  async function audited(workload: string): Promise<Stats> {
    const { stats } = await backup('incremental', true);
    seen.push({ workload, audit: true, tracked: stats.trackedChunks, changed: stats.auditChanged, missed: stats.auditMissed, extra: stats.auditExtra, read: stats.chunksRead });
    expect(stats.fallbackReason, 'the tracker must be valid for an audit').toBe('');
    expect(stats.changeSource).toBe('digest-compare (audit)');
    expect(stats.audited).toBe(true);
    expect(stats.auditMissed, `${workload}: the tracker missed changed chunks`).toBe(0);
    // The audit read every chunk, so it proves something about all of them.
    expect(stats.chunksRead).toBeGreaterThan(0);
    return stats;
  }

  /** A plain incremental: only the chunks the tracker marked are read. */
  async function trackerDriven(workload: string): Promise<Stats> {
    const { stats } = await backup('incremental');
    seen.push({ workload, audit: false, tracked: stats.trackedChunks, read: stats.chunksRead, sent: stats.chunksSent });
    expect(stats.fallbackReason).toBe('');
    expect(stats.changeSource).toBe('tracker');
    expect(stats.chunksRead).toBeLessThanOrEqual(Number(stats.trackedChunks));
    expect(stats.chunksRead).toBeLessThan(Number(stats.chunksTotal) / 4);
    expect(stats.chunksSent).toBeGreaterThan(0);
    return stats;
  }

  it('full, then an audited incremental with the tracker valid from the full on', async () => {
    const full = await backup('full');
    expect(full.stats.changeSource).toBe('full');
    // Whatever PostgreSQL wrote in the background meanwhile: nothing missed.
    await audited('idle after full');
  });

  it('pgbench: audited 0 missed, then a tracker-driven incremental is byte-identical', async () => {
    await pg.pgbench({ transactions: 400, clients: 2 });
    const a = await audited('pgbench 400 tx');
    expect(a.auditChanged).toBeGreaterThan(0);
    await pg.pgbench({ transactions: 200, clients: 2 });
    await trackerDriven('pgbench 200 tx');
  });

  it('bulk COPY', async () => {
    await pg.query('create table bulk(v bigint)');
    await pg.query(`copy bulk from program 'seq 1 300000'`);
    await pg.query('checkpoint');
    const rows = await pg.query<{ n: string }>('select count(*)::text as n from bulk');
    expect(rows[0]!.n).toBe('300000');
    expect((await audited('COPY 300 000 rows')).auditChanged).toBeGreaterThan(0);
  });

  it('VACUUM FULL of a table', async () => {
    await pg.query('delete from bulk where v % 3 <> 0');
    await pg.query('vacuum full bulk');
    await pg.query('checkpoint');
    expect((await audited('VACUUM FULL')).auditChanged).toBeGreaterThan(0);
  });

  it('DROP TABLE + fstrim: discards are changes too', async () => {
    await pg.query('drop table bulk');
    // PostgreSQL unlinks a dropped relation's file at the next checkpoint.
    await pg.query('checkpoint');
    const trimmed = await fstrim(lab.volumeMount);
    expect(trimmed).toBeGreaterThan(0);
    expect((await audited('DROP TABLE + fstrim')).auditChanged).toBeGreaterThan(0);
  });

  it('files deleted and rewritten outside PostgreSQL', async () => {
    const first = join(lab.volumeMount, 'outside-1.bin');
    await ddWrite(first, { bs: 1 << 20, count: 24 });
    expect((await audited('dd 24 MiB file')).auditChanged).toBeGreaterThanOrEqual(24 * 16);
    await rm(first);
    await ddWrite(join(lab.volumeMount, 'outside-2.bin'), { bs: 1 << 20, count: 16 });
    expect((await audited('rm + dd 16 MiB file')).auditChanged).toBeGreaterThanOrEqual(16 * 16);
    // Rewrite in place, scattered 4 KiB blocks, and let the tracker alone choose what to read.
    for (const seek of [3, 700, 1500, 2900]) {
      await ddWrite(join(lab.volumeMount, 'outside-2.bin'), { bs: 4096, count: 1, seek, noTruncate: true });
    }
    const t = await trackerDriven('in-place 4 KiB rewrites');
    expect(t.chunksSent).toBeGreaterThanOrEqual(4);
  });
});
