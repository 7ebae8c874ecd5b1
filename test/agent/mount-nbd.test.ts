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
import { chmod, mkdtemp, readdir, rm } from 'node:fs/promises';
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
import { buildPgImage, grantOf, serveCow, serveImage, walSourceOf, type PgImage } from './mount-image-fixture.js';
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

async function writableUri(): Promise<string> {
  return serveCow(fx, nbd.server.uri(nbd.newName()));
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
  expect((await readdir(mountsDir(stateDir))).filter((n) => n.startsWith(s.mountId))).toEqual([]);
}

describe('NbdLocalMounter: a real image over NBD', () => {
  it('mounts, PostgreSQL answers with every acknowledged tick, takes writes, unmounts leaving nothing', async () => {
    const m = await mounter.mount(grantOf(img, await writableUri()), walSourceOf(img), {});
    made.push(m);
    expect(m.secondsToFirstQuery).toBeGreaterThan(0);
    expect(m.pgPort).not.toBe(img.source.port);
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
});
