/**
 * kill -9 of the appliance with a real mount up (issue 9): `blocksnap-appliance
 * serve` as a process, an in-process agent of a PostgreSQL 15 volume, a full
 * backup, `blocksnap-appliance mount IMAGE --on db1` (nbdfuse attached to the
 * appliance's NBD server, loop, ext4, a running postmaster). The appliance is
 * killed with SIGKILL, so the copy's NBD connection breaks under it, and
 * started again on the same data directory and port. At that start it ends
 * the mount and deletes its overlay; when the agent reconnects it is told
 * (MountRelease) and releases everything: no postmaster, FUSE or ext4 mount,
 * loop device, nbdfuse process or state file names the mount afterwards, and
 * the image verifies clean.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { parseConnection } from '../../agent/mount/restore-check.js';
import { readMountTable } from '../../agent/snapshot/fsfreeze.js';
import { MOUNTS_DIR } from '../../appliance/mounts/mount-manager.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { applianceCmd, type ApplianceProcess } from '../../scripts/lab/processes.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { e2eFixture, type E2eFixture } from '../support/e2e-fixture.js';

let fx: E2eFixture;
let lab: VolumeLab;
let source: PgCluster;
let appl: ApplianceProcess;
let dataDir: string;
let agent: Agent;
let imageId: string;

async function query<T extends pg.QueryResultRow>(connection: string, sql: string): Promise<T[]> {
  const c = new pg.Client({ ...parseConnection(connection), connectionTimeoutMillis: 5_000 });
  c.on('error', () => undefined);
  await c.connect();
  try {
    return (await c.query<T>(sql)).rows;
  } finally {
    await c.end().catch(() => undefined);
  }
}

/** What on this host still names the mount: mounts, loop devices, processes. */
async function leftOnHost(mountId: string): Promise<string[]> {
  const left = (await readMountTable()).filter((m) => m.mountPoint.includes(mountId) || m.source.includes(mountId)).map((m) => `mount ${m.mountPoint}`);
  for (const n of (await readdir('/sys/block')).filter((x) => x.startsWith('loop'))) {
    const b = await readFile(`/sys/block/${n}/loop/backing_file`, 'utf8').catch(() => '');
    if (b.includes(mountId)) left.push(`loop ${n}`);
  }
  for (const pid of (await readdir('/proc')).filter((x) => /^\d+$/.test(x))) {
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(mountId)) left.push(`process ${pid}: ${cmd.replace(/\0/g, ' ')}`);
  }
  return left;
}

beforeAll(async () => {
  fx = e2eFixture();
  lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 ** 3, name: 'pgdata' });
  source = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
  await source.query("CREATE TABLE t (id int PRIMARY KEY, pad text); INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g");
  dataDir = join(lab.root, 'appliance');
  appl = await fx.applianceProcess(dataDir, { logFile: join(lab.root, 'appliance-1.log') });
  const add = await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json']);
  expect(add.exitCode, add.stderr).toBe(0);
  agent = await fx.pgAgent({
    url: appl.url, name: 'db1', token: add.json.token, volume: lab.volume, stateDir: join(lab.root, 'agent-db1'),
    postgres: { host: '127.0.0.1', port: source.port, user: 'postgres', role: 'primary' }, extra: { reconnectMaxMs: 500 },
  });
  const b = await applianceCmd(dataDir, ['backup', 'db1', 'pgdata', '--full', '--json']);
  expect(b.exitCode, b.stderr + b.stdout).toBe(0);
  imageId = b.json.imageId;
}, 300_000);

afterAll(() => fx?.dispose(), 300_000);

describe('kill -9 of the appliance with a mount up', () => {
  it('after the restart the agent releases the mount (postmaster, ext4, loop, FUSE, nbdfuse), the appliance ended it, the image verifies', async () => {
    const r = await applianceCmd(dataDir, ['mount', imageId, '--on', 'db1', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(0);
    const mountId = r.json.mountId as string;
    fx.defer(`mount ${mountId}`, () => agent.mounts.unmount(mountId).catch(() => undefined));
    expect((await query<{ n: string }>(r.json.connection, 'SELECT count(*)::text AS n FROM t'))[0]!.n).toBe('3000');
    expect((await readdir(join(dataDir, MOUNTS_DIR))).filter((n) => n.startsWith(mountId))).not.toEqual([]);

    await appl.kill9();
    appl = await fx.applianceProcess(dataDir, { port: appl.port, logFile: join(lab.root, 'appliance-2.log') });

    // The agent reconnects, is told the mount ended, and releases every local step.
    await expect.poll(async () => (await agent.mounts.list()).length, { timeout: 90_000, interval: 250 }).toBe(0);
    await expect.poll(() => leftOnHost(mountId), { timeout: 30_000, interval: 250 }).toEqual([]);
    expect((await readdir(join(lab.root, 'agent-db1', 'mounts')).catch(() => [] as string[])).filter((n) => n.startsWith(mountId))).toEqual([]);
    // The appliance ended it at its start and removed the overlay.
    const show = await applianceCmd(dataDir, ['mounts', 'show', mountId, '--json']);
    expect(show.exitCode, show.stderr).toBe(0);
    expect(show.json).toMatchObject({ state: 'ended', endReason: expect.stringContaining('restart') });
    expect((await readdir(join(dataDir, MOUNTS_DIR))).filter((n) => n.startsWith(mountId))).toEqual([]);
    const v = await applianceCmd(dataDir, ['verify', imageId, '--json']);
    expect(v.exitCode, v.stderr).toBe(0);
    // And the image mounts again through the new process.
    const again = await applianceCmd(dataDir, ['mount', imageId, '--on', 'db1', '--json']);
    expect(again.exitCode, again.stderr + again.stdout).toBe(0);
    fx.defer(`mount ${again.json.mountId}`, () => agent.mounts.unmount(again.json.mountId).catch(() => undefined));
    expect((await query<{ n: string }>(again.json.connection, 'SELECT count(*)::text AS n FROM t'))[0]!.n).toBe('3000');
    await agent.mounts.unmount(again.json.mountId);
    expect(await leftOnHost(again.json.mountId)).toEqual([]);
  }, 300_000);
});
