import { spawn } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { findMount } from '../../agent/snapshot/fsfreeze.js';
import { cleanupLeftovers } from '../../scripts/lab/cleanup.js';
import { isAlive } from '../../proto/shared/proc.js';
import { readLedger, type LedgerFile } from '../../scripts/lab/ledger.js';
import { loopBackingFile, loopDirectIo } from '../../scripts/lab/loop.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { createVolumeLab, type VolumeLab } from '../../scripts/lab/volume-lab.js';
import { isBlocksnapError } from '../../proto/errors.js';

const MiB = 1024 * 1024;
const repo = fileURLToPath(new URL('../..', import.meta.url));
let tmp: string;
const teardown: Array<() => Promise<unknown>> = [];

/** Lines of `losetup -a` and /proc/mounts that mention `dir`: what this test may have left. */
async function leftoversUnder(dir: string): Promise<string[]> {
  const loops = String((await execa('losetup', ['-a'])).stdout).split('\n');
  const mounts = (await readFile('/proc/mounts', 'utf8')).split('\n');
  return [...loops, ...mounts].filter((l) => l.includes(dir));
}

async function deadPid(): Promise<number> {
  const child = spawn('true');
  await new Promise((r) => child.on('exit', r));
  return child.pid!;
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'bsn-lab-test-'));
});

afterEach(async () => {
  // Reverse order: a cluster goes before the volume it lives on.
  for (const fn of teardown.splice(0).reverse()) await fn().catch(() => undefined);
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('createVolumeLab', () => {
  it('builds reflink XFS pool + direct-I/O ext4 volume, and destroy releases exactly that', async () => {
    const ledgerDir = path.join(tmp, 'ledgers-1');
    const lab = await createVolumeLab({ poolSize: 512 * MiB, volumeSize: 64 * MiB, ledgerDir });
    teardown.push(() => lab.destroy());

    const pool = await findMount(lab.poolMount);
    const vol = await findMount(lab.volumeMount);
    expect(pool).toMatchObject({ fstype: 'xfs', source: lab.poolDevice });
    expect(vol).toMatchObject({ fstype: 'ext4', source: lab.volumeDevice });
    expect(vol!.options.split(',')).toContain('noatime');
    expect(await loopBackingFile(lab.poolDevice)).toBe(lab.poolImage);
    expect(await loopBackingFile(lab.volumeDevice)).toBe(lab.volumeImage);
    expect(await loopDirectIo(lab.volumeDevice)).toBe(true);
    expect(String((await execa('xfs_info', [lab.poolMount])).stdout)).toMatch(/reflink=1/);
    expect(path.dirname(lab.volumeImage)).toBe(lab.poolMount);
    expect(lab.volume).toMatchObject({ name: 'vol', device: lab.volumeDevice, image: lab.volumeImage, mountpoint: lab.volumeMount });

    const ledger = await readLedger(lab.ledgerPath);
    expect(ledger.owner.pid).toBe(process.pid);
    expect(ledger.resources.map((r) => r.kind)).toEqual(['dir', 'loop', 'mount', 'loop', 'mount']);
    expect(await leftoversUnder(lab.root)).toHaveLength(4);

    const actions = await lab.destroy();
    expect(actions.map((a) => `${a.kind}:${a.outcome}`)).toEqual(['mount:released', 'loop:released', 'mount:released', 'loop:released', 'dir:released']);
    expect(await leftoversUnder(lab.root)).toEqual([]);
    await expect(stat(lab.root)).rejects.toThrow();
    expect(await readdir(ledgerDir)).toEqual([]);
    await lab.destroy();
  });

  it('also releases an image file from its pool that a dead test attached and mounted elsewhere', async () => {
    const ledgerDir = path.join(tmp, 'ledgers-nested');
    const lab = await createVolumeLab({ poolSize: 512 * MiB, volumeSize: 64 * MiB, ledgerDir });
    teardown.push(() => lab.destroy());
    // What an e2e test does with an export: a file on the pool, attached, mounted outside the pool.
    const img = path.join(lab.poolMount, 'export.raw');
    await copyFile(lab.volumeImage, img);
    const dev = String((await execa('losetup', ['-f', '--show', img])).stdout).trim();
    const mnt = path.join(lab.root, 'restored');
    await mkdir(mnt);
    await execa('mount', ['-o', 'ro,noload', dev, mnt]);
    expect(await findMount(mnt)).toBeTruthy();
    await lab.destroy();
    expect(await leftoversUnder(lab.root)).toEqual([]);
    expect(String((await execa('losetup', ['-a'])).stdout)).not.toContain(img);
  });

  it('releases what it had already created when a later step fails', async () => {
    const ledgerDir = path.join(tmp, 'ledgers-2');
    const root = path.join(tmp, 'failing-lab');
    // 16 KiB is too small for mkfs.ext4: the pool is up by then.
    const err = await createVolumeLab({ root, poolSize: 512 * MiB, volumeSize: 16 * 1024, ledgerDir }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isBlocksnapError(err, 'E_DEVICE'), String(err)).toBe(true);
    expect(String((err as Error).message)).toMatch(/mkfs\.ext4/);
    expect(await leftoversUnder(root)).toEqual([]);
    expect(await readdir(ledgerDir)).toEqual([]);
  });
});

describe('PgCluster on a lab volume', () => {
  it('initdb with checksums, start, pgbench, query, stop', async () => {
    const lab = await createVolumeLab({ poolSize: 1024 * MiB, volumeSize: 256 * MiB, ledgerDir: path.join(tmp, 'ledgers-3') });
    teardown.push(() => lab.destroy());
    const pg = new PgCluster({ dataDir: path.join(lab.volumeMount, 'pgdata'), ledgerDir: path.join(tmp, 'ledgers-3') });
    teardown.push(() => pg.destroy());

    await pg.initdb();
    await pg.start();
    const pid = pg.pid!;
    expect(await isAlive(pid, null)).toBe(true);
    expect((await stat(pg.dataDir)).dev).toBe((await stat(lab.volumeMount)).dev);
    await pg.pgbenchInit(1);
    const bench = await pg.pgbench({ transactions: 50, clients: 2 });
    expect(bench.transactions).toBe(100);
    expect(bench.tps).toBeGreaterThan(0);
    const [history] = await pg.query<{ n: string }>('SELECT count(*) AS n FROM pgbench_history');
    expect(Number(history!.n)).toBe(100);
    const [accounts] = await pg.query<{ n: string }>('SELECT count(*) AS n FROM pgbench_accounts');
    expect(Number(accounts!.n)).toBe(100_000);
    expect(await pg.query('SHOW data_checksums')).toEqual([{ data_checksums: 'on' }]);
    expect(await pg.query<{ setting: string }>("SELECT setting FROM pg_settings WHERE name = 'data_directory'")).toEqual([{ setting: pg.dataDir }]);

    // A copy of a live data directory carries the live postmaster's pid file:
    // stopping the copy's (never started) cluster must not touch the original.
    const copy = path.join(lab.volumeMount, 'copied-pgdata');
    await mkdir(copy);
    for (const f of ['PG_VERSION', 'postmaster.pid']) await copyFile(path.join(pg.dataDir, f), path.join(copy, f));
    await execa('chown', ['-R', 'postgres:postgres', copy]);
    await new PgCluster({ dataDir: copy, ledgerDir: path.join(tmp, 'ledgers-3') }).stop();
    expect(await isAlive(pid, null)).toBe(true);
    expect(await pg.query('SELECT 1 AS one')).toEqual([{ one: 1 }]);

    await pg.stop();
    expect(await isAlive(pid, null)).toBe(false);
    await pg.stop();
    await pg.destroy();
    await lab.destroy();
    expect(await leftoversUnder(lab.root)).toEqual([]);
  });

  it('stop and destroy are safe after a failed start', async () => {
    const ledgerDir = path.join(tmp, 'ledgers-5');
    const pg = new PgCluster({ dataDir: path.join(tmp, 'never-initialised'), ledgerDir });
    teardown.push(() => pg.destroy());
    const err = await pg.start().then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isBlocksnapError(err, 'E_PG'), String(err)).toBe(true);
    expect(pg.pid).toBeUndefined();
    const runDir = pg.runDir!;
    expect((await stat(runDir)).isDirectory()).toBe(true);
    await pg.stop();
    await pg.destroy();
    await pg.destroy();
    await expect(stat(runDir)).rejects.toThrow();
    expect(await readdir(ledgerDir)).toEqual([]);
  });
});

describe('cleanupLeftovers', () => {
  it('leaves live owners alone and releases a lab and cluster whose owner is dead', async () => {
    const ledgerDir = path.join(tmp, 'ledgers-4');
    const lab = await createVolumeLab({ poolSize: 512 * MiB, volumeSize: 128 * MiB, ledgerDir });
    teardown.push(() => lab.destroy());
    const pg = new PgCluster({ dataDir: path.join(lab.volumeMount, 'pgdata'), ledgerDir });
    teardown.push(() => pg.destroy());
    await pg.initdb();
    await pg.start();
    const pid = pg.pid!;
    const runDir = pg.runDir!;

    const live = await cleanupLeftovers({ ledgerDir });
    expect(live.actions).toEqual([]);
    expect(live.live.map((l) => l.pid)).toEqual([process.pid, process.pid]);

    // Pretend the owner was killed: a pid that is gone, a start time that matches nothing.
    const dead = await deadPid();
    for (const name of await readdir(ledgerDir)) {
      const file = path.join(ledgerDir, name);
      const ledger: LedgerFile = await readLedger(file);
      ledger.owner = { ...ledger.owner, pid: dead, startTime: '1' };
      await writeFile(file, JSON.stringify(ledger));
    }

    const dry = await cleanupLeftovers({ ledgerDir, dryRun: true });
    expect(new Set(dry.actions.map((a) => a.outcome))).toEqual(new Set(['would-release']));
    expect(dry.actions.map((a) => a.kind).sort()).toEqual(['dir', 'dir', 'ledger', 'ledger', 'loop', 'loop', 'mount', 'mount', 'postmaster']);
    expect(await isAlive(pid, null)).toBe(true);
    expect(await leftoversUnder(lab.root)).toHaveLength(4);

    const cli = await execa('npx', ['tsx', 'scripts/cleanup.ts', '--dry-run', '--json', '--ledger-dir', ledgerDir], { cwd: repo, reject: false });
    expect(cli.exitCode, String(cli.stderr)).toBe(0);
    expect(JSON.parse(String(cli.stdout)).actions).toHaveLength(dry.actions.length);
    expect(await leftoversUnder(lab.root)).toHaveLength(4);

    const report = await cleanupLeftovers({ ledgerDir });
    expect(report.failures).toBe(0);
    expect(report.actions.filter((a) => a.outcome !== 'released')).toEqual([]);
    expect(report.actions[0]).toMatchObject({ kind: 'postmaster' });
    expect(await isAlive(pid, null)).toBe(false);
    expect(await leftoversUnder(lab.root)).toEqual([]);
    await expect(stat(lab.root)).rejects.toThrow();
    await expect(stat(runDir)).rejects.toThrow();
    expect(await readdir(ledgerDir)).toEqual([]);

    // The owners' own teardown finds nothing left to do.
    await pg.destroy();
    await lab.destroy();
  });

  it('the cleanup command prints help', async () => {
    const r = await execa('npx', ['tsx', 'scripts/cleanup.ts', '--help'], { cwd: repo, reject: false });
    expect(r.exitCode).toBe(0);
    expect(String(r.stdout)).toMatch(/--dry-run/);
    const bad = await execa('npx', ['tsx', 'scripts/cleanup.ts', '--bogus'], { cwd: repo, reject: false });
    expect(bad.exitCode).toBe(2);
  });
});
