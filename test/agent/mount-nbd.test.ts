/**
 * The agent's instant mount against real parts: a committed PostgreSQL 15
 * image (built once for the file) served by the appliance's NbdServer,
 * attached with nbdfuse + a loop device, ext4 mounted, prepared, PostgreSQL
 * started as its owner on a port of its own — beside the still running
 * source. Each test checks that nothing is left behind: no FUSE or ext4
 * mount, loop device, nbdfuse or postmaster process, state file.
 */
import { execa } from 'execa';
import { spawn } from 'node:child_process';
import { chmod, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { LocalMount } from '../../agent/mount/mount-port.js';
import { mountsDir, readMountStates, type MountState } from '../../agent/mount/mount-state.js';
import { NbdLocalMounter } from '../../agent/mount/nbd-local-mounter.js';
import { readMountTable } from '../../agent/snapshot/fsfreeze.js';
import { isAlive } from '../../proto/shared/proc.js';
import { e2eFixture, testLogger } from '../support/e2e-fixture.js';
import { codeOf } from '../support/error-code.js';
import { waitFor } from '../support/wait-for.js';
import { buildPgImage, grantOf, serveImage, walSourceOf, type PgImage } from './mount-image-fixture.js';
import { loopsBackedBy } from '../../agent/mount/loop-device.js';

const fx = e2eFixture();
let img: PgImage;
let nbd: Awaited<ReturnType<typeof serveImage>>;
let stateDir: string;
let runBase: string;
let mounter: NbdLocalMounter;

beforeAll(async () => {
  img = await buildPgImage(fx, { volumeSize: 256 << 20, poolSize: 1024 ** 3 });
  nbd = await serveImage(fx, img);
  stateDir = await mkdtemp(join(tmpdir(), 'bsn-mount-state-'));
  fx.defer('state dir', () => rm(stateDir, { recursive: true, force: true }));
  runBase = await mkdtemp(join(tmpdir(), 'bsn-mounts-'));
  await chmod(runBase, 0o711); // PostgreSQL runs as its data directory's owner: it must traverse to it
  fx.defer('run base', () => rm(runBase, { recursive: true, force: true }));
  mounter = new NbdLocalMounter({ stateDir, runBase, log: testLogger() });
}, 300_000);

afterAll(() => fx.dispose(), 300_000);

/** Every mount this file made, unmounted if a test failed before doing it. */
const made: LocalMount[] = [];
afterEach(async () => {
  for (const m of made.splice(0)) await mounter.unmount(m.mountId).catch(() => undefined);
  await mounter.cleanupOrphans().catch(() => undefined);
});

/** A writable export with its own overlay in the appliance's NbdServer, as the mount manager hands out. */
async function writableUri(): Promise<string> {
  return nbd.server.uri(await nbd.newWritableName());
}

async function client(m: LocalMount): Promise<pg.Client> {
  const kv = Object.fromEntries(m.connection.split(' ').map((p) => p.split('=') as [string, string]));
  const c = new pg.Client({ host: kv.host, port: Number(kv.port), user: kv.user, database: kv.dbname });
  await c.connect();
  return c;
}

/** What a mount's state recorded, for the nothing-left check after it is gone. */
async function stateOf(mountId: string): Promise<MountState> {
  const s = (await readMountStates(stateDir)).find((x) => x.state.mountId === mountId);
  if (!s) throw new Error(`no state for ${mountId}`);
  return JSON.parse(JSON.stringify(s.state)) as MountState;
}

async function expectNothingLeft(s: MountState): Promise<void> {
  const mounts = await readMountTable();
  for (const step of s.steps) {
    if (step.kind === 'fs') expect(mounts.some((m) => m.mountPoint === step.target), `fs at ${step.target}`).toBe(false);
    if (step.kind === 'nbdfuse') {
      expect(mounts.some((m) => m.mountPoint === step.dir), `FUSE at ${step.dir}`).toBe(false);
      if (step.pid) expect(await isAlive(step.pid, step.startTime ?? null), `nbdfuse ${step.pid}`).toBe(false);
    }
    if (step.kind === 'loop') expect(await loopsBackedBy(step.backingFile), `loop over ${step.backingFile}`).toEqual([]);
    if (step.kind === 'postmaster' && step.pid) expect(await isAlive(step.pid, step.startTime ?? null), `postmaster ${step.pid}`).toBe(false);
  }
  await expectNothingOf(s.mountId);
}

/**
 * Whatever the record says: no mount, loop device or process anywhere on
 * the host names this mount (every path a mount creates holds its id: the
 * FUSE dir, the target, the socket dir, nbdfuse's and postgres's command lines).
 */
async function expectNothingOf(mountId: string): Promise<void> {
  expect((await readMountTable()).filter((m) => m.mountPoint.includes(mountId))).toEqual([]);
  const loops: string[] = [];
  for (const n of (await readdir('/sys/block')).filter((x) => x.startsWith('loop'))) {
    const b = await readFile(`/sys/block/${n}/loop/backing_file`, 'utf8').catch(() => '');
    if (b.includes(mountId)) loops.push(`${n}: ${b.trim()}`);
  }
  expect(loops).toEqual([]);
  const procs: string[] = [];
  for (const pid of (await readdir('/proc')).filter((x) => /^\d+$/.test(x))) {
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(mountId)) procs.push(`${pid}: ${cmd.replace(/\0/g, ' ')}`);
  }
  expect(procs).toEqual([]);
  expect((await readdir(mountsDir(stateDir)).catch(() => [])).filter((n) => n.startsWith(mountId))).toEqual([]);
  expect((await readdir(runBase)).filter((n) => n.startsWith(mountId))).toEqual([]);
}

describe('NbdLocalMounter: a real image over NBD', () => {
  it('mounts, PostgreSQL answers with every acknowledged tick, takes writes, unmounts leaving nothing', async () => {
    const m = await mounter.mount(grantOf(img, await writableUri()), walSourceOf(img), {});
    made.push(m);
    expect(m.secondsToFirstQuery).toBeGreaterThan(0);
    expect(m.pgPort).not.toBe(img.source.port);
    // Prepared without barriers, but PostgreSQL runs on a filesystem whose fsyncs flush.
    const line = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').find((l) => l.split(' ')[4] === m.target);
    expect(line).toMatch(/ - ext4 /);
    expect(line).not.toMatch(/nobarrier|barrier=0/);
    const c = await client(m);
    try {
      const [r] = (await c.query<{ rec: boolean; n: string; min: string; max: string }>(
        'SELECT pg_is_in_recovery() AS rec, count(*)::text AS n, min(id)::text AS min, max(id)::text AS max FROM tick')).rows;
      expect(r!.rec).toBe(false);
      expect(Number(r!.min)).toBe(1);
      expect(Number(r!.max)).toBeGreaterThanOrEqual(img.ackedBefore);
      expect(Number(r!.n)).toBe(Number(r!.max)); // contiguous
      await c.query("INSERT INTO tick SELECT 1000000, 'written on the mount'");
      await c.query('CHECKPOINT');
    } finally {
      await c.end();
    }
    // The source is untouched by the copy's write.
    expect((await img.source.query<{ n: string }>('SELECT count(*)::text AS n FROM tick WHERE id = 1000000'))[0]!.n).toBe('0');
    const s = await stateOf(m.mountId);
    expect(s.steps.map((x) => x.kind)).toEqual(['dir', 'dir', 'dir', 'nbdfuse', 'loop', 'fs', 'dir', 'postmaster']);
    await mounter.unmount(m.mountId);
    made.length = 0;
    await expectNothingLeft(s);
    await expect(mounter.unmount(m.mountId)).rejects.toMatchObject({ code: 'E_NOT_FOUND' });
  }, 180_000);

  it('an export name the server refuses: E_DEVICE, every step taken released, no state file', async () => {
    const grant = grantOf(img, nbd.server.uri('0123456789abcdef0123456789abcdef'));
    expect(await codeOf(mounter.mount(grant, walSourceOf(img), {}))).toBe('E_DEVICE');
    await expectNothingOf(grant.mountId);
  }, 120_000);

  it('a port in use: E_PG after PostgreSQL fails to bind, the mount is undone (postmaster, ext4, loop, FUSE, dirs)', async () => {
    const blockers: net.Server[] = [];
    const listen = (host: string, port: number) => new Promise<net.Server | null>((resolve) => {
      const srv = net.createServer();
      srv.once('error', () => resolve(null));
      srv.listen(port, host, () => resolve(srv));
    });
    const first = (await listen('127.0.0.1', 0))!;
    blockers.push(first);
    const port = (first.address() as net.AddressInfo).port;
    const v6 = await listen('::1', port); // 'localhost' may also resolve to ::1: take it too where there is IPv6
    if (v6) blockers.push(v6);
    try {
      const grant = grantOf(img, await writableUri());
      expect(await codeOf(mounter.mount(grant, walSourceOf(img), { pgPort: port }))).toBe('E_PG');
      await expectNothingOf(grant.mountId);
    } finally {
      for (const b of blockers) await new Promise((r) => b.close(r));
    }
  }, 120_000);

  it('as a standby: answers in recovery with the image data, read-only', async () => {
    const m = await mounter.mount(grantOf(img, await writableUri()), walSourceOf(img), { asStandby: true });
    made.push(m);
    const c = await client(m);
    try {
      const [r] = (await c.query<{ rec: boolean; max: string }>('SELECT pg_is_in_recovery() AS rec, max(id)::text AS max FROM tick')).rows;
      expect(r!.rec).toBe(true);
      expect(Number(r!.max)).toBeGreaterThanOrEqual(img.ackedBefore);
      await expect(c.query("INSERT INTO tick SELECT 2000000, 'x'")).rejects.toThrow(/read-only/);
    } finally {
      await c.end();
    }
    const s = await stateOf(m.mountId);
    await mounter.unmount(m.mountId);
    made.length = 0;
    await expectNothingLeft(s);
  }, 180_000);

  it('a crash-consistent grant (no label): PostgreSQL crash-recovers the snapshot, every acknowledged tick, no gap', async () => {
    const grant = grantOf(img, await writableUri());
    delete grant.exports[0]!.pg;
    const m = await mounter.mount(grant, walSourceOf(img), {});
    made.push(m);
    const c = await client(m);
    try {
      const [r] = (await c.query<{ rec: boolean; n: string; min: string; max: string; arch: string }>(
        "SELECT pg_is_in_recovery() AS rec, count(*)::text AS n, min(id)::text AS min, max(id)::text AS max, current_setting('archive_mode') AS arch FROM tick")).rows;
      expect(r).toMatchObject({ rec: false, min: '1', arch: 'off' });
      expect(Number(r!.max)).toBeGreaterThanOrEqual(img.ackedBefore);
      expect(Number(r!.n)).toBe(Number(r!.max));
    } finally {
      await c.end();
    }
    const s = await stateOf(m.mountId);
    await mounter.unmount(m.mountId);
    made.length = 0;
    await expectNothingLeft(s);
    // Without a label there is no standby to make: refused before any step.
    expect(await codeOf(mounter.mount(grant, walSourceOf(img), { asStandby: true }))).toBe('E_USAGE');
    await expectNothingOf(grant.mountId);
  }, 180_000);

  it('three clones at once: each its own port and NBD connection, each sees only its own writes', async () => {
    const uris = await Promise.all([0, 1, 2].map(() => writableUri()));
    const clones = await Promise.all(uris.map((u) => mounter.mount(grantOf(img, u), walSourceOf(img), {})));
    made.push(...clones);
    expect(new Set(clones.map((c) => c.pgPort)).size).toBe(3);
    for (const [i, m] of clones.entries()) {
      const c = await client(m);
      await c.query(`CREATE TABLE clone_mark (who int); INSERT INTO clone_mark VALUES (${i}); INSERT INTO tick SELECT ${3000000 + i}, 'clone'`);
      await c.end();
    }
    for (const [i, m] of clones.entries()) {
      const c = await client(m);
      const marks = (await c.query<{ who: number }>('SELECT who FROM clone_mark')).rows.map((r) => r.who);
      const ticks = (await c.query<{ id: string }>('SELECT id::text FROM tick WHERE id >= 3000000')).rows.map((r) => Number(r.id));
      await c.end();
      expect(marks).toEqual([i]);
      expect(ticks).toEqual([3000000 + i]);
    }
    const states = await Promise.all(clones.map((m) => stateOf(m.mountId)));
    for (const m of clones) await mounter.unmount(m.mountId);
    made.length = 0;
    for (const s of states) await expectNothingLeft(s);
  }, 240_000);

  for (const when of ['after PostgreSQL answered', 'mid-mount (loop step recorded)'] as const) {
    it(`kill -9 of the process holding a mount ${when}: cleanupOrphans releases everything it left`, async () => {
      const grant = grantOf(img, await writableUri());
      const walDir = await mkdtemp(join(tmpdir(), 'bsn-mount-wal-'));
      fx.defer('wal dir', () => rm(walDir, { recursive: true, force: true }));
      for (const w of grant.exports[0]!.pg!.wal) await writeFile(join(walDir, w), await walSourceOf(img)(img.imageId, w));
      const jobFile = join(walDir, 'job.json');
      await writeFile(jobFile, JSON.stringify({ stateDir, runBase, grant, walDir }));
      const child = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, 'mount-holder-child.ts'), jobFile], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      child.stdout.on('data', (b: Buffer) => { out += b.toString(); });
      child.stderr.on('data', (b: Buffer) => { err += b.toString(); });
      const exited = new Promise((r) => child.once('exit', r));
      try {
        const recorded = async (kind: string) => (await readMountStates(stateDir)).some((x) => x.state.steps.some((st) => st.kind === kind));
        if (when === 'after PostgreSQL answered') {
          await waitFor('the child to mount', () => out.includes('\n'), { timeoutMs: 120_000, detail: () => err });
        } else {
          await waitFor('the loop step to be recorded', () => recorded('loop'), { timeoutMs: 120_000, everyMs: 2, detail: () => err });
        }
      } finally {
        child.kill('SIGKILL');
        await exited;
      }
      const [left] = (await readMountStates(stateDir)).map((x) => x.state);
      expect(left?.mountId).toBe(grant.mountId);
      if (when === 'after PostgreSQL answered') {
        const pm = left!.steps.find((x) => x.kind === 'postmaster')!;
        expect(pm.kind === 'postmaster' && pm.pid && (await isAlive(pm.pid, pm.startTime ?? null))).toBe(true); // it outlived its holder
      }
      expect(await mounter.cleanupOrphans()).toEqual([grant.mountId]);
      await expectNothingLeft(left!);
      expect(await readdir(runBase)).toEqual([]);
      expect(await mounter.cleanupOrphans()).toEqual([]);
    }, 240_000);
  }
});
