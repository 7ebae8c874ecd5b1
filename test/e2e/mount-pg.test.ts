/**
 * Instant mount of a real backed-up PostgreSQL 15 image, the demo's flow
 * with every real part: a live cluster with a ticker on a volume lab, a
 * full backup through the in-process appliance and agent, then
 * `blocksnap-agent mount` (on the source's host) and `blocksnap-appliance
 * mount --on` (on another agent: the test-copy flow) through the real CLIs
 * (dist/: `npm run build`), the real NBD server and overlay, the real
 * LocalMounter (nbdfuse + loop + ext4 + prepare + postmaster). Each copy
 * answers with every acknowledged tick, takes a write, and is unmounted
 * leaving nothing behind on the host or the appliance; the image verifies
 * clean afterwards.
 */
import { execa } from 'execa';
import { readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { readMountTable } from '../../agent/snapshot/fsfreeze.js';
import { MOUNTS_DIR } from '../../appliance/mounts/mount-manager.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { agentCli, applianceCmd } from '../../scripts/lab/processes.js';
import { e2eFixture, type E2eFixture } from '../support/e2e-fixture.js';
import { PgTicker, TICK_TABLE_SQL } from '../support/pg-ticker.js';

let fx: E2eFixture;
let appl: ApplianceHarness;
let source: PgCluster;
let imageId: string;
let ackedBefore: number;
const configs: Record<string, string> = {};
const agents: Record<string, Agent> = {};

/** `blocksnap-agent ARGS --config FILE` (the running in-process agent answers on its control socket). */
async function agentCmd(name: string, args: string[]) {
  const r = await execa(process.execPath, [agentCli(), ...args, '--config', configs[name]!], { reject: false, stdin: 'ignore' });
  return { exitCode: r.exitCode, stdout: String(r.stdout), stderr: String(r.stderr), json: args.includes('--json') && r.exitCode === 0 ? JSON.parse(String(r.stdout)) : undefined };
}

async function query<T extends pg.QueryResultRow>(connection: string, sql: string): Promise<T[]> {
  const kv = Object.fromEntries(connection.split(' ').map((p) => p.split('=') as [string, string]));
  const c = new pg.Client({ host: kv.host, port: Number(kv.port), user: kv.user, database: kv.dbname });
  await c.connect();
  try {
    return (await c.query<T>(sql)).rows;
  } finally {
    await c.end();
  }
}

/** The copy holds every tick acknowledged before the backup, without a gap, and takes a write. */
async function checkCopy(connection: string, mark: number): Promise<void> {
  const [r] = await query<{ rec: boolean; n: string; min: string; max: string }>(connection,
    'SELECT pg_is_in_recovery() AS rec, count(*)::text AS n, min(id)::text AS min, max(id)::text AS max FROM tick');
  expect(r!.rec).toBe(false);
  expect(Number(r!.min)).toBe(1);
  expect(Number(r!.max)).toBeGreaterThanOrEqual(ackedBefore);
  expect(Number(r!.n)).toBe(Number(r!.max));
  await query(connection, `INSERT INTO tick SELECT ${mark}, 'written on the mount'; CHECKPOINT`);
  expect((await query<{ n: string }>(connection, `SELECT count(*)::text AS n FROM tick WHERE id = ${mark}`))[0]!.n).toBe('1');
}

/** Nothing on this host or the appliance names the mount any more: mounts, loop devices, processes, overlays, rows. */
async function expectNothingLeft(mountId: string): Promise<void> {
  expect((await readMountTable()).filter((m) => m.mountPoint.includes(mountId) || m.source.includes(mountId))).toEqual([]);
  const loops: string[] = [];
  for (const n of (await readdir('/sys/block')).filter((x) => x.startsWith('loop'))) {
    const b = await readFile(`/sys/block/${n}/loop/backing_file`, 'utf8').catch(() => '');
    if (b.includes(mountId)) loops.push(n);
  }
  expect(loops).toEqual([]);
  const procs: string[] = [];
  for (const pid of (await readdir('/proc')).filter((x) => /^\d+$/.test(x))) {
    const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmd.includes(mountId)) procs.push(`${pid}: ${cmd.replace(/\0/g, ' ')}`);
  }
  expect(procs).toEqual([]);
  // `unmount` returns once the appliance acknowledged the release: ended there, overlay gone.
  expect(appl.app.mounts.mounts.get(mountId)?.state).toBe('ended');
  expect((await readdir(join(appl.dataDir, MOUNTS_DIR))).filter((n) => n.startsWith(mountId))).toEqual([]);
}

beforeAll(async () => {
  fx = e2eFixture();
  const lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 ** 3, name: 'pgdata' });
  source = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
  await source.query(TICK_TABLE_SQL);
  appl = await fx.appliance(['db1', 'db2']);
  const postgres = { host: '127.0.0.1', port: source.port, user: 'postgres', role: 'primary' };
  const raw = {
    db1: { appliance: appl.url, agent: 'db1', token: appl.tokens.db1!, stateDir: join(lab.root, 'agent-db1'), volumes: [lab.volume], tracking: 'tracefs', postgres },
    db2: { appliance: appl.url, agent: 'db2', token: appl.tokens.db2!, stateDir: join(lab.root, 'agent-db2'), volumes: [], tracking: 'off' },
  };
  for (const [name, c] of Object.entries(raw)) {
    configs[name] = join(lab.root, `${name}.json`);
    await writeFile(configs[name]!, JSON.stringify(c));
  }
  agents.db1 = await fx.pgAgent({ url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir: raw.db1.stateDir, postgres });
  agents.db2 = (await fx.agent({ url: appl.url, name: 'db2', token: appl.tokens.db2!, volumes: [], stateDir: raw.db2.stateDir, tracking: 'off' })).agent;
  const ticker = new PgTicker({ host: '127.0.0.1', port: source.port, user: 'postgres', database: 'postgres' });
  await ticker.start();
  fx.defer('ticker', () => ticker.stop());
  ackedBefore = await ticker.reach(20);
  const outcome = await appl.app.router.startJob('db1', 'pgdata', 'full').done;
  await ticker.stop();
  if (!outcome.ok) throw new Error(`backup failed: ${JSON.stringify(outcome)}`);
  imageId = outcome.imageId!;
}, 300_000);

afterAll(() => fx?.dispose(), 300_000);

describe('instant mount of a real PostgreSQL image', () => {
  it('blocksnap-agent mount: PostgreSQL answers beside the source with the image\'s data; unmount leaves nothing', async () => {
    const r = await agentCmd('db1', ['mount', imageId, '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    const m = r.json;
    fx.defer(`mount ${m.mountId}`, () => agents.db1!.mounts.unmount(m.mountId).catch(() => undefined));
    expect(m.pgPort).not.toBe(source.port);
    expect(m.secondsToFirstQuery).toBeGreaterThan(0);
    expect(m.secondsFromCommand).toBeGreaterThanOrEqual(m.secondsToFirstQuery);
    await checkCopy(m.connection, 1_000_001);
    // The source is untouched by the copy's write.
    expect((await source.query<{ n: string }>('SELECT count(*)::text AS n FROM tick WHERE id = 1000001'))[0]!.n).toBe('0');
    expect((await applianceCmd(appl.dataDir, ['images', 'show', imageId])).stdout).toContain(`mounted:     yes (${m.mountId})`);
    const un = await agentCmd('db1', ['unmount', m.mountId]);
    expect(un.exitCode, un.stderr).toBe(0);
    await expectNothingLeft(m.mountId);
    expect((await agentCmd('db1', ['mounts', '--json'])).json).toEqual([]);
  }, 240_000);

  it('blocksnap-appliance mount --on another agent: the test-copy flow; removing the mount unmounts it there', async () => {
    const r = await applianceCmd(appl.dataDir, ['mount', imageId, '--on', 'db2', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(0);
    const m = r.json;
    fx.defer(`mount ${m.mountId}`, () => agents.db2!.mounts.unmount(m.mountId).catch(() => undefined));
    expect(m).toMatchObject({ ok: true, connection: expect.stringContaining('port=') });
    expect(m.secondsToFirstQuery).toBeGreaterThan(0);
    await checkCopy(m.connection, 1_000_002);
    const rm = await applianceCmd(appl.dataDir, ['mounts', 'remove', m.mountId]);
    expect(rm.exitCode, rm.stderr).toBe(0);
    await expect.poll(async () => (await agents.db2!.mounts.list()).length, { timeout: 60_000, interval: 200 }).toBe(0);
    await expectNothingLeft(m.mountId);
    // Nothing done on the mounts reached the image.
    const v = await applianceCmd(appl.dataDir, ['verify', imageId, '--json']);
    expect(v.exitCode, v.stderr).toBe(0);
    expect(v.json[0]).toMatchObject({ ok: true, imageId });
  }, 240_000);

  it('kill -9 of an agent with a mount up: its next start releases the mount, the appliance ends it; nothing left, the image intact', async () => {
    const token = appl.app.catalog.addAgent('db3');
    const stateDir = join(appl.dataDir, '..', `agent-db3-${process.pid}`);
    const config = join(appl.dataDir, '..', `db3-${process.pid}.json`);
    await writeFile(config, JSON.stringify({ appliance: appl.url, agent: 'db3', token, stateDir, volumes: [], tracking: 'off' }));
    fx.defer('db3 files', () => rm(stateDir, { recursive: true, force: true }).then(() => rm(config, { force: true })));
    const connected = () => appl.app.router.connectedAgents().some((a) => a.agent === 'db3');
    const first = fx.agentProcess(config, join(appl.dataDir, '..', 'db3-1.log'));
    await expect.poll(connected, { timeout: 30_000, interval: 100 }).toBe(true);
    const r = await applianceCmd(appl.dataDir, ['mount', imageId, '--on', 'db3', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(0);
    const mountId = r.json.mountId as string;
    await checkCopy(r.json.connection, 1_000_003);
    await first.kill9();
    // The copy outlives the killed agent (its nbdfuse and postmaster are not its process group's)...
    expect((await query<{ one: number }>(r.json.connection, 'SELECT 1 AS one'))[0]!.one).toBe(1);
    expect(appl.app.mounts.mounts.get(mountId)?.state).toBe('active');
    // ...until the agent starts again: it releases what the killed run left, and the appliance ends the mount.
    fx.agentProcess(config, join(appl.dataDir, '..', 'db3-2.log'));
    await expect.poll(() => appl.app.mounts.mounts.get(mountId)?.state, { timeout: 60_000, interval: 200 }).toBe('ended');
    await expectNothingLeft(mountId);
    const v = await applianceCmd(appl.dataDir, ['verify', imageId, '--json']);
    expect(v.exitCode, v.stderr).toBe(0);
  }, 240_000);
});
