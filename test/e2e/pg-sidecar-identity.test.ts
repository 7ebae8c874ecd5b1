import { execa } from 'execa';
import { createHash } from 'node:crypto';
import { cp, lstat, mkdir, readFile, readdir, readlink, realpath, rm, rmdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { prepareFromExport } from '../../agent/pg/prepare-from-export.js';
import { readControlCheckpoint } from '../../agent/pg/sidecar-check.js';
import { parseLsn } from '../../agent/pg/sql-table.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { exportImageTo } from '../../appliance/ops/export-image.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { createLogger } from '../../proto/shared/log.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';

/**
 * A PostgreSQL sidecar names its image and the file it was exported with,
 * and `prepare` applies it only to that data (DESIGN.md §8). Two real
 * PostgreSQL 15 images A and B of one cluster (B after more commits and a
 * checkpoint), exported and mounted through loop devices:
 *   - B exported over A's mounted export: B's sidecar is refused for A's data;
 *     a crash-consistent export over it leaves no sidecar or WAL;
 *   - A's sidecar next to B's file, A's sidecar with B's data mounted, and
 *     A's sidecar forged to name B's file are all refused, and the data
 *     directory is byte for byte what it was;
 *   - B's own sidecar prepares B, which starts and has B's rows.
 */
const log = createLogger('test', process.env.BLOCKSNAP_LOG ?? 'warn');

/** Every file under `dir` (content hash, or link target), to prove "untouched". */
async function fingerprint(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const walk = async (d: string, rel: string) => {
    for (const n of (await readdir(d)).sort()) {
      const p = join(d, n);
      const st = await lstat(p);
      if (st.isSymbolicLink()) out[rel + n] = `-> ${await readlink(p)}`;
      else if (st.isDirectory()) await walk(p, `${rel}${n}/`);
      else out[rel + n] = `${st.mode.toString(8)} ${createHash('sha256').update(await readFile(p)).digest('hex')}`;
    }
  };
  await walk(dir, '');
  return out;
}

async function rejection(p: Promise<unknown>): Promise<Error> {
  return p.then(() => { throw new Error('expected a rejection'); }, (e) => e as Error);
}

describe('PostgreSQL sidecars name their image (PostgreSQL 15)', () => {
  const fx = e2eFixture();
  let lab: VolumeLab;
  let pgc: PgCluster;
  let appl: ApplianceHarness;
  let agent: Agent;
  const images: Record<'A' | 'B', { id: string; rootDigest: string; pg: Record<string, unknown> | null }> = {} as never;
  const files: Record<'A' | 'B', string> = {} as never;

  /** Attaches and mounts `file`; returns the data directory inside it. */
  async function mount(file: string, name: string): Promise<string> {
    const dev = await attachLoop(file);
    const backing = await realpath(file);
    fx.defer('detachLoop(dev, { backingFile: backing })', () => detachLoop(dev, { backingFile: backing }));
    const mnt = join(lab.root, `mnt-${name}`);
    await mkdir(mnt, { recursive: true });
    fx.defer('rmdir(mnt)', () => rmdir(mnt));
    await execa('mount', ['-t', 'ext4', '-o', 'noatime', dev, mnt]);
    fx.defer('execa("umount", [mnt])', () => execa('umount', [mnt]));
    return join(mnt, 'pg');
  }

  beforeAll(async () => {
    lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 ** 3, name: 'pgdata' });
    pgc = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
    await pgc.query('create table t (id int primary key)');
    await pgc.query('insert into t select generate_series(1, 100)');
    appl = await fx.appliance(['db1']);
    agent = await fx.pgAgent({
      url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir: join(lab.root, 'agent-state'),
      postgres: { host: '127.0.0.1', port: pgc.port, user: 'postgres', role: 'primary' }, log,
    });
    for (const k of ['A', 'B'] as const) {
      if (k === 'B') {
        await pgc.query('insert into t select generate_series(101, 200)');
        await pgc.query('checkpoint');
      }
      const job = appl.app.router.startJob('db1', 'pgdata', 'full');
      const o = await job.done;
      expect(o, JSON.stringify(o)).toMatchObject({ ok: true });
      const img = appl.app.catalog.image(o.imageId!)!;
      images[k] = img;
      files[k] = join(lab.poolMount, `export-${k}.raw`);
      fx.defer('rm(files[k], { force: true })', () => rm(files[k], { force: true }));
      fx.defer('rm(`${files[k]}.blocksnap.json`, { force: true })', () => rm(`${files[k]}.blocksnap.json`, { force: true }));
      fx.defer('rm(`${files[k]}.wal`, { recursive: true, force: true })', () => rm(`${files[k]}.wal`, { recursive: true, force: true }));
      await exportImageTo(appl.app.store, img, files[k]);
    }
  }, 180_000);

  afterAll(() => fx.dispose());

  it('pg_control is read where pg_controldata reads it', async () => {
    const cd = await execa('/usr/lib/postgresql/15/bin/pg_controldata', [pgc.dataDir], { env: { LC_ALL: 'C' } });
    const want = /Latest checkpoint location:\s+([0-9A-F]+\/[0-9A-F]+)/.exec(cd.stdout)![1]!;
    expect(await readControlCheckpoint(pgc.dataDir, 150000)).toBe(parseLsn(want));
  });

  it('an export replaced while mounted, then by a crash-consistent one: prepare refuses the mounted data each time, and no sidecar survives', async () => {
    const f = join(lab.poolMount, 'export-S.raw');
    fx.defer('rm(f, { force: true })', () => rm(f, { force: true }));
    fx.defer('rm(`${f}.blocksnap.json`, { force: true })', () => rm(`${f}.blocksnap.json`, { force: true }));
    fx.defer('rm(`${f}.wal`, { recursive: true, force: true })', () => rm(`${f}.wal`, { recursive: true, force: true }));
    await exportImageTo(appl.app.store, images.A, f);
    expect((await readdir(lab.poolMount)).filter((n) => n.startsWith('export-S.raw')).sort()).toEqual(['export-S.raw', 'export-S.raw.blocksnap.json', 'export-S.raw.wal']);
    const dataDir = await mount(f, 'S'); // A's data
    const before = await fingerprint(dataDir);

    // B exported over the same path while A's copy is mounted: B's sidecar names the new file, not the mounted one.
    await exportImageTo(appl.app.store, images.B, f, { force: true });
    const e1 = await rejection(prepareFromExport(dataDir, f));
    expect(isBlocksnapError(e1, 'E_USAGE'), e1.message).toBe(true);
    expect(e1.message).toMatch(/was replaced or removed after it was attached/);
    expect(await fingerprint(dataDir)).toEqual(before);

    await exportImageTo(appl.app.store, { ...images.B, pg: null }, f, { force: true });
    expect((await readdir(lab.poolMount)).filter((n) => n.includes('export-S.raw'))).toEqual(['export-S.raw']);
    const e2 = await rejection(prepareFromExport(dataDir, f));
    expect(isBlocksnapError(e2, 'E_NOT_FOUND'), e2.message).toBe(true);
    expect(await fingerprint(dataDir)).toEqual(before);
  });

  it("another image's sidecar is refused, whichever link of the chain is wrong, and nothing is written", async () => {
    const dataDir = await mount(files.B, 'B');
    const before = await fingerprint(dataDir);
    expect(Object.keys(before)).not.toContain('backup_label');
    const ownSidecar = await readFile(`${files.B}.blocksnap.json`, 'utf8');
    const ownWal = join(lab.root, 'B.wal.saved');
    await cp(`${files.B}.wal`, ownWal, { recursive: true });
    fx.defer('rm(ownWal, { recursive: true, force: true })', () => rm(ownWal, { recursive: true, force: true }));
    const expectRefused = async (file: string, re: RegExp) => {
      const e = await rejection(prepareFromExport(dataDir, file));
      expect(isBlocksnapError(e, 'E_USAGE'), e.message).toBe(true);
      expect(e.message).toMatch(re);
      expect(await fingerprint(dataDir)).toEqual(before);
    };

    // 1. A stale sidecar + WAL of A next to B's file (what the old export left behind).
    await writeFile(`${files.B}.blocksnap.json`, await readFile(`${files.A}.blocksnap.json`));
    await rm(`${files.B}.wal`, { recursive: true });
    await cp(`${files.A}.wal`, `${files.B}.wal`, { recursive: true });
    await expectRefused(files.B, new RegExp(`not the file the sidecar of image ${images.A.id} was exported with`));

    // 2. A's own export, valid for A's file, applied to B's mounted data.
    await expectRefused(files.A, /backing file is .*export-B\.raw, not .*export-A\.raw/);

    // 3. A's sidecar forged to name B's file: B's pg_control is past A's stop LSN.
    const forged = JSON.parse(await readFile(`${files.A}.blocksnap.json`, 'utf8'));
    const st = await stat(files.B, { bigint: true });
    forged.exportFile = { ...forged.exportFile, ino: String(st.ino), birthtimeNs: String(st.birthtimeNs), size: Number(st.size) };
    await writeFile(`${files.B}.blocksnap.json`, JSON.stringify(forged));
    await expectRefused(files.B, /last checkpoint .* is outside image .*'s backup/);

    // 4. A sidecar from before sidecars named their image.
    await writeFile(`${files.B}.blocksnap.json`, JSON.stringify({ ...JSON.parse(ownSidecar), version: 1 }));
    const old = await rejection(prepareFromExport(dataDir, files.B));
    expect(isBlocksnapError(old, 'E_FORMAT'), old.message).toBe(true);
    expect(await fingerprint(dataDir)).toEqual(before);

    // B's own sidecar and WAL: prepared, it starts and has B's rows.
    await writeFile(`${files.B}.blocksnap.json`, ownSidecar);
    await rm(`${files.B}.wal`, { recursive: true });
    await cp(ownWal, `${files.B}.wal`, { recursive: true });
    const prep = await prepareFromExport(dataDir, files.B);
    expect(prep.imageId).toBe(images.B.id);
    expect(prep.written).toContain('backup_label');
    const restored = await fx.pg({ dataDir }, false);
    await restored.start();
    await waitFor('the restored cluster to end recovery', async () =>
      !(await restored.query<{ r: boolean }>('select pg_is_in_recovery() as r'))[0]!.r, { timeoutMs: 60_000, everyMs: 50 });
    expect((await restored.query<{ n: string }>('select count(*)::text as n from t'))[0]!.n).toBe('200');
  }, 120_000);
});
