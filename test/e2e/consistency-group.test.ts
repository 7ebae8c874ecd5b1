import { execa } from 'execa';
import { lstat, mkdir, readdir, stat, readlink, realpath, rm, rmdir, symlink, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { prepareFromExport } from '../../agent/pg/prepare-from-export.js';
import { ReflinkSnapshotProvider } from '../../agent/snapshot/reflink-snapshot-provider.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { checkChecksums } from '../support/pg-checksums.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { initdbSplitWal } from '../support/pg-split-wal.js';
import { PgTicker, TICK_TABLE_SQL, tickIds } from '../support/pg-ticker.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { exportImageTo } from '../../appliance/ops/export-image.js';
import { lastRestoreVerification, verifyRestore } from '../../appliance/ops/verify-restore.js';
import type { PgImageInfo } from '../../appliance/store/pg-image-info.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { createLogger } from '../../proto/shared/log.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';

/**
 * A consistency group through the whole product: PostgreSQL 15 with its
 * data directory on one volume and pg_wal (`initdb --waldir`) on another;
 * both volumes are one group, snapshotted inside one quiesce window at one
 * instant and committed as one image set. The restored set (both exports
 * mounted, pg_wal pointed at the restored WAL volume) starts, reaches
 * consistency, has clean checksums and every id acknowledged before the
 * backup, with no gap.
 */
const log = createLogger('test', process.env.BLOCKSNAP_LOG ?? 'warn');

describe('consistency group: data directory and pg_wal on two volumes (PostgreSQL 15)', () => {
  const fx = e2eFixture();
  let dataLab: VolumeLab;
  let walLab: VolumeLab;
  let pgc: PgCluster;
  let appl: ApplianceHarness;
  let agent: Agent;

  beforeAll(async () => {
    dataLab = await fx.lab({ volumeSize: 512 << 20, poolSize: 1024 ** 3, name: 'pgdata' });
    walLab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 ** 3, name: 'pgwal' });
    pgc = await fx.pg({ dataDir: join(dataLab.volumeMount, 'pg') }, false);
    await initdbSplitWal({ dataDir: join(dataLab.volumeMount, 'pg'), walDir: join(walLab.volumeMount, 'wal') });
    await pgc.start();
    await pgc.query(TICK_TABLE_SQL);
    appl = await fx.appliance(['db1']);
    const stateDir = join(dataLab.root, 'agent-state');
    await mkdir(stateDir, { recursive: true });
    const volumes = [dataLab.volume, walLab.volume];
    const config = parseAgentConfig({
      appliance: appl.url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes,
      groups: [{ name: 'pg', volumes: ['pgdata', 'pgwal'] }],
      postgres: { host: '127.0.0.1', port: pgc.port, user: 'postgres', role: 'primary' },
    });
    agent = fx.add('agent', await composeAgent(config, log), (a) => a.stop()); // the config's provider (reflink) and tracker, as the CLI composes them
    await agent.start();
    await agent.waitConnected(10_000);
  });

  afterAll(() => fx.dispose());

  it('commits one image set per job (full, then incremental); the restored set starts with every acknowledged id', async () => {
    expect(await readlink(join(dataLab.volumeMount, 'pg', 'pg_wal'))).toBe(join(walLab.volumeMount, 'wal'));
    const ticker = new PgTicker(pgc.connectionConfig());
    await ticker.start();
    fx.defer('ticker.stop()', () => ticker.stop());
    await ticker.reach(30);
    const full = appl.app.router.startJob('db1', 'pg', 'full');
    const fullOutcome = await full.done;
    expect(fullOutcome, JSON.stringify(fullOutcome)).toMatchObject({ ok: true });
    const fullSet = appl.app.catalog.listImages().filter((i) => i.jobId === full.id);
    expect(fullSet.map((i) => i.volume).sort()).toEqual(['pgdata', 'pgwal']);

    await ticker.reach(ticker.acked + 30);
    const ackedBefore = ticker.acked;
    const inc = appl.app.router.startJob('db1', 'pg', 'incremental');
    const outcome = await inc.done;
    await ticker.reach(ticker.acked + 5);
    await ticker.stop();
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });

    const set = appl.app.catalog.listImages().filter((i) => i.jobId === inc.id);
    expect(set.map((i) => i.volume).sort()).toEqual(['pgdata', 'pgwal']);
    const setId = set[0]!.setId;
    expect(setId).toMatch(/^set-/);
    expect(set.every((i) => i.setId === setId)).toBe(true);
    expect(setId).not.toBe(fullSet[0]!.setId);
    const dataImg = set.find((i) => i.volume === 'pgdata')!;
    const walImg = set.find((i) => i.volume === 'pgwal')!;
    // Each member is an incremental on its own chain.
    expect(dataImg).toMatchObject({ kind: 'incremental', basisImageId: fullSet.find((i) => i.volume === 'pgdata')!.id });
    expect(walImg).toMatchObject({ kind: 'incremental', basisImageId: fullSet.find((i) => i.volume === 'pgwal')!.id });
    const info = dataImg.pg as unknown as PgImageInfo;
    expect(info.labelFile).toContain(`LABEL: blocksnap ${inc.id}`);
    expect(walImg.pg).toEqual(dataImg.pg);
    expect(outcome.imageId).toBe(dataImg.id);
    // No backup is left running on the server, no snapshot left in either pool.
    const running = await pgc.query<{ n: string }>(`select count(*)::text as n from pg_stat_activity where application_name like 'blocksnap%'`);
    expect(running[0]!.n).toBe('0');
    for (const lab of [dataLab, walLab]) expect(await readdir(join(lab.poolMount, '.blocksnap')).catch(() => [])).toEqual([]);
    // Both members were frozen in the same window, and the trackers (valid since the full) chose the chunks.
    const st = outcome.stats as Record<string, unknown>;
    expect(Number(st.freezeSeconds)).toBeGreaterThan(0);
    expect(st.changeSource).toBe('tracker');

    // Restore the set: both exports mounted, pg_wal re-pointed at the restored WAL volume.
    const mounts: Record<string, string> = {};
    for (const img of [dataImg, walImg]) {
      const file = join(dataLab.poolMount, `export-${img.volume}.raw`);
      fx.defer('rm(file, { force: true })', () => rm(file, { force: true }));
      fx.defer('rm(`${file}.wal`, { recursive: true, force: true })', () => rm(`${file}.wal`, { recursive: true, force: true }));
      fx.defer('rm(`${file}.blocksnap.json`, { force: true })', () => rm(`${file}.blocksnap.json`, { force: true }));
      await exportImageTo(appl.app.store, img, file);
      const dev = await attachLoop(file);
      const backing = await realpath(file);
      fx.defer('detachLoop(dev, { backingFile: backing })', () => detachLoop(dev, { backingFile: backing }));
      const mnt = join(dataLab.root, `restored-${img.volume}`);
      await mkdir(mnt, { recursive: true });
      fx.defer('rmdir(mnt)', () => rmdir(mnt));
      await execa('mount', ['-t', 'ext4', '-o', 'noatime', dev, mnt]);
      fx.defer('execa("umount", [mnt])', () => execa('umount', [mnt]));
      mounts[img.volume] = mnt;
    }
    const dataDir = join(mounts.pgdata!, 'pg');
    const link = join(dataDir, 'pg_wal');
    expect((await lstat(link)).isSymbolicLink()).toBe(true);
    // The snapshot's link names the LIVE WAL directory: it must never be followed from the restore.
    await unlink(link);
    await symlink(join(mounts.pgwal!, 'wal'), link);
    const prep = await prepareFromExport(dataDir, join(dataLab.poolMount, 'export-pgdata.raw'));
    expect(prep.written).toContain('backup_label');
    expect(prep.walCopied.length).toBe(info.wal.length);

    const restored = await fx.pg({ dataDir }, false);
    await restored.start();
    await waitFor('the restored set to end recovery', async () =>
      !(await restored.query<{ r: boolean }>('select pg_is_in_recovery() as r'))[0]!.r, { timeoutMs: 20_000, everyMs: 100 });
    const ids = await tickIds(restored);
    expect(ids.min).toBe(1);
    expect(ids.max).toBeGreaterThanOrEqual(ackedBefore);
    expect(ids.n).toBe(ids.max); // contiguous: no gap
    const sums = await checkChecksums(restored, 150000);
    expect(sums.ok, sums.output).toBe(true);
  });

  it('refuses a member volume backed up alone (E_USAGE): it would not be consistent with the other members', () => {
    let err: unknown = null;
    try {
      appl.app.router.startJob('db1', 'pgwal', 'full');
    } catch (e) {
      err = e;
    }
    expect(isBlocksnapError(err, 'E_USAGE')).toBe(true);
    expect(String((err as Error).message)).toMatch(/back up group pg instead/);
  });

  it('verify --restore of the image set: both volumes mounted on the agent, pg_wal re-pointed into the mounted WAL volume, checked; the live WAL directory untouched', async () => {
    const setId = appl.app.catalog.listImages().filter((i) => i.setId).at(-1)!.setId!;
    const members = appl.app.catalog.listImages().filter((i) => i.setId === setId);
    expect(members.map((i) => i.volume).sort()).toEqual(['pgdata', 'pgwal']);
    // The source stopped, so its WAL directory (where the image's pg_wal link points) must not change at all.
    await pgc.stop();
    const walDir = join(walLab.volumeMount, 'wal');
    const listing = async () => Promise.all((await readdir(walDir)).sort().map(async (n) => {
      const st = await stat(join(walDir, n));
      return `${n} ${st.size} ${st.mtimeMs} ${st.ino}`;
    }));
    const before = await listing();
    try {
      const v = await verifyRestore({ catalog: appl.app.catalog, mountProtocol: appl.app.mountProtocol, mounts: appl.app.mounts }, setId, 'db1', 180_000);
      expect(v.ok, JSON.stringify(v)).toBe(true);
      expect(v.check!.tables.find((t) => t.table === 'tick')!.rows).toBeGreaterThan(0);
      expect(await listing()).toEqual(before);
      for (const m of members) expect(lastRestoreVerification(appl.app.catalog, m.id)).toMatchObject({ ok: true, imageId: m.id });
    } finally {
      await pgc.start();
    }
  }, 240_000);
});
