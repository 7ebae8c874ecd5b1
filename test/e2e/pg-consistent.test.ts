import { execa } from 'execa';
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { prepareFromExport } from '../../agent/pg/prepare-from-export.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { exportImageTo } from '../../appliance/ops/export-image.js';
import type { PgImageInfo } from '../../appliance/store/pg-image-info.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';

/**
 * An application-consistent image of a PRIMARY through the whole product:
 * the agent holds one session with pg_backup_start across the snapshot, the
 * label, LSNs and the WAL up to the stop LSN travel with the image, and
 * `prepare` makes the exported image start: it reaches consistency, its
 * checksums are clean, and every id a ticker had committed before the
 * backup started is there, with no gap.
 */
describe('application-consistent image of a primary (PostgreSQL 15)', () => {
  let lab: VolumeLab;
  let pgc: PgCluster;
  let appl: ApplianceHarness;
  let agent: Agent;
  const fx = e2eFixture();

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 512 << 20, poolSize: 2 * 1024 ** 3, name: 'pgdata' });
    pgc = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
    await pgc.query('create table ticks (id int primary key)');
    appl = await fx.appliance(['db1']);
    agent = await fx.pgAgent({
      url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir: join(lab.root, 'agent-state'),
      postgres: { host: '127.0.0.1', port: pgc.port, user: 'postgres', role: 'primary' },
    });
  });

  afterAll(() => fx.dispose());

  it('carries label, LSNs and WAL; the exported image starts with every acknowledged id', async () => {
    // One session ticks ids, each committed before the next.
    const ticker = new pg.Client({ host: '127.0.0.1', port: pgc.port, user: 'postgres', database: 'postgres' });
    await ticker.connect();
    let next = 1;
    let stop = false;
    const ticking = (async () => {
      while (!stop) await ticker.query('insert into ticks values ($1)', [next++]);
    })();
    // The job starts once ticks are landing (more than a handful acknowledged).
    await waitFor('the ticker to commit ids', () => next - 1 > 10, { timeoutMs: 10_000, everyMs: 10 });
    const ackedBefore = next - 1;
    const job = appl.app.router.startJob('db1', 'pgdata', 'full');
    const outcome = await job.done;
    stop = true;
    await ticking;
    await ticker.end();
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    expect(ackedBefore).toBeGreaterThan(10);

    // No backup is left in progress on the server.
    const running = await pgc.query<{ n: string }>(`select count(*)::text as n from pg_stat_activity where backend_type = 'client backend' and application_name like 'blocksnap%'`);
    expect(running[0]!.n).toBe('0');

    const img = appl.app.catalog.image(outcome.imageId!)!;
    const info = img.pg as unknown as PgImageInfo;
    // The job result reports the quiesce window next to the freeze window.
    const jobStats = appl.app.catalog.job(job.id)!.stats as Record<string, unknown>;
    expect(jobStats.pgRole).toBe('primary');
    expect(Number(jobStats.pgBackupSeconds)).toBeGreaterThan(0);
    expect(Number(jobStats.freezeSeconds)).toBeGreaterThan(0);
    expect(info.role).toBe('primary');
    expect(info.labelFile).toMatch(/^START WAL LOCATION: /);
    expect(info.labelFile).toContain(`LABEL: blocksnap ${job.id}`);
    expect(info.stopLsn).toMatch(/^[0-9A-F]+\/[0-9A-F]+$/);
    expect(info.wal.length).toBeGreaterThan(0);

    const out = join(lab.poolMount, 'export.raw');
    fx.defer('rm(out, { force: true })', () => rm(out, { force: true }));
    fx.defer('rm(`${out}.wal`, { recursive: true, force: true })', () => rm(`${out}.wal`, { recursive: true, force: true }));
    await exportImageTo(appl.app.store, { ...img, pg: info }, out);
    expect((await readdir(`${out}.wal`)).sort()).toEqual(['.blocksnap-wal', ...info.wal.map((w) => w.name).sort()]); // segments + blocksnap's marker

    const dev = await attachLoop(out);
    fx.defer('detachLoop(dev)', () => detachLoop(dev));
    const mnt = join(lab.root, 'restored');
    await mkdir(mnt, { recursive: true });
    await execa('mount', ['-t', 'ext4', '-o', 'noatime', dev, mnt]);
    fx.defer('execa("umount", [mnt])', () => execa('umount', [mnt]));
    const prep = await prepareFromExport(join(mnt, 'pg'), out);
    expect(prep.written).toContain('backup_label');
    expect(prep.walCopied.length).toBe(info.wal.length);

    const restored = await fx.pg({ dataDir: join(mnt, 'pg') }, false);
    await restored.start();
    await waitFor('the restored cluster to end recovery', async () =>
      !(await restored.query<{ r: boolean }>('select pg_is_in_recovery() as r'))[0]!.r, { timeoutMs: 10_000, everyMs: 100 });
    const ids = await restored.query<{ min: number; max: number; n: string }>('select min(id) as min, max(id) as max, count(*)::text as n from ticks');
    expect(ids[0]!.min).toBe(1);
    expect(ids[0]!.max).toBeGreaterThanOrEqual(ackedBefore);
    expect(Number(ids[0]!.n)).toBe(ids[0]!.max); // contiguous: no gap
    await restored.stop();
    const check = await execa('/usr/lib/postgresql/15/bin/pg_checksums', ['--check', '-D', join(mnt, 'pg')], { reject: false, uid: 101 } as any);
    expect(check.exitCode, String(check.stderr) + String(check.stdout)).toBe(0);
  });

  it('refuses a primary that is not where the volume is, and holds nothing', async () => {
    await mkdir(join(lab.root, 'elsewhere'), { mode: 0o755 });
    const other = await fx.pg({ dataDir: join(lab.root, 'elsewhere', 'pg') });
    await agent.stop(); // one connection per agent name
    await fx.pgAgent({
      url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir: join(lab.root, 'agent-state-2'),
      postgres: { host: '127.0.0.1', port: other.port, user: 'postgres', role: 'primary' },
    });
    const job = appl.app.router.startJob('db1', 'pgdata', 'full');
    const outcome = await job.done;
    expect(outcome).toMatchObject({ ok: false, errorCode: 'E_CONFIG' });
    expect(outcome.errorMessage).toMatch(/not on volume pgdata/);
    const held = await other.query<{ n: string }>(`select count(*)::text as n from pg_stat_activity where application_name like 'blocksnap%'`);
    expect(held[0]!.n).toBe('0');
    expect(await readdir(join(lab.poolMount, '.blocksnap')).catch(() => [])).toEqual([]);
  });
});
