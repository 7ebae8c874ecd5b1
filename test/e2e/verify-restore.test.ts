/**
 * `blocksnap-appliance verify IMAGE --restore --on AGENT` with every real
 * part (issue 9 item 8): a PostgreSQL 15 cluster on a volume lab, full
 * backups through the in-process appliance and agent, then the real CLI
 * (dist/: `npm run build`) asks another agent to mount the image (nbdfuse +
 * loop + ext4 + prepare + postmaster), run amcheck and a row count of every
 * table, and unmount. A clean image verifies OK; an image whose btree index
 * page was damaged on the source before the backup fails with the index
 * named. Both results are recorded with the image (`images show`), and
 * nothing is left mounted on the agent or the appliance.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import { freePort } from '../../proto/shared/free-port.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { applianceCmd } from '../../scripts/lab/processes.js';
import { e2eFixture, type E2eFixture } from '../support/e2e-fixture.js';

let fx: E2eFixture;
let appl: ApplianceHarness;
let source: PgCluster;
let goodImage: string;
let badImage: string;
let brokenImage: string;
const agents: Record<string, Agent> = {};

const ROWS = 20_000;

async function backup(): Promise<string> {
  const outcome = await appl.app.router.startJob('db1', 'pgdata', 'full').done;
  if (!outcome.ok) throw new Error(`backup failed: ${JSON.stringify(outcome)}`);
  return outcome.imageId!;
}

/** Neither the agent nor the appliance holds a mount any more. */
async function expectNoMount(): Promise<void> {
  expect(await agents.db2!.mounts.list()).toEqual([]);
  expect(appl.app.mounts.mounts.list().filter((m) => m.state === 'active')).toEqual([]);
}

beforeAll(async () => {
  fx = e2eFixture();
  const lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 ** 3, name: 'pgdata' });
  // A fixed port: the agent's config names it, and the source restarts once.
  source = await fx.pg({ dataDir: join(lab.volumeMount, 'pg'), port: await freePort() });
  await source.query(`CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL);
    INSERT INTO accounts SELECT g, 'owner ' || g FROM generate_series(1, ${ROWS}) g;
    CREATE SCHEMA audit; CREATE TABLE audit.events (at timestamptz, what text); INSERT INTO audit.events SELECT now(), 'e' FROM generate_series(1, 7);
    CHECKPOINT`);
  appl = await fx.appliance(['db1', 'db2', 'db3']);
  const postgres = { host: '127.0.0.1', port: source.port, user: 'postgres', role: 'primary' };
  agents.db1 = await fx.pgAgent({ url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir: join(lab.root, 'agent-db1'), postgres });
  agents.db2 = (await fx.agent({ url: appl.url, name: 'db2', token: appl.tokens.db2!, volumes: [], stateDir: join(lab.root, 'agent-db2'), tracking: 'off' })).agent;
  goodImage = await backup();

  // Damage a leaf page of the primary key's btree on the source (server stopped, so nothing caches it):
  // the cluster has data checksums, and nothing reads the index before amcheck does on the mounted copy.
  const [rel] = await source.query<{ path: string; blocks: string }>(
    "SELECT pg_relation_filepath('accounts_pkey') AS path, pg_relation_size('accounts_pkey') / 8192 AS blocks");
  expect(Number(rel!.blocks)).toBeGreaterThan(3);
  await source.stop();
  const f = await open(join(source.dataDir, rel!.path), 'r+');
  try {
    await f.write(Buffer.alloc(512, 0x5a), 0, 512, 2 * 8192 + 1024);
    await f.sync();
  } finally {
    await f.close();
  }
  await source.start();
  badImage = await backup();

  // A crash-consistent image of a data directory whose pg_control does not match its CRC: PostgreSQL cannot start on it.
  const lab3 = await fx.lab({ volumeSize: 128 << 20, poolSize: 512 << 20, name: 'broken' });
  const broken = await fx.pg({ dataDir: join(lab3.volumeMount, 'pg') }, false);
  await broken.initdb();
  const ctl = await open(join(broken.dataDir, 'global', 'pg_control'), 'r+');
  try {
    await ctl.write(Buffer.alloc(8, 0xff), 0, 8, 16);
    await ctl.sync();
  } finally {
    await ctl.close();
  }
  await fx.agent({ url: appl.url, name: 'db3', token: appl.tokens.db3!, volumes: [lab3.volume], stateDir: join(lab3.root, 'agent-db3'), tracking: 'off' });
  const b3 = await appl.app.router.startJob('db3', 'broken', 'full').done;
  if (!b3.ok) throw new Error(`backup failed: ${JSON.stringify(b3)}`);
  brokenImage = b3.imageId!;
}, 300_000);

afterAll(() => fx?.dispose(), 300_000);

describe('verify --restore', () => {
  it('a clean image: mounted on another agent, amcheck clean, every table counted; recorded OK with the image; nothing left mounted', async () => {
    const r = await applianceCmd(appl.dataDir, ['verify', goodImage, '--restore', '--on', 'db2', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(0);
    const v = r.json;
    expect(v).toMatchObject({ ok: true, imageId: goodImage, agent: 'db2', reason: null });
    expect(v.check.ok).toBe(true);
    expect(v.check.problems).toEqual([]);
    expect(v.check.serverVersion).toBeGreaterThanOrEqual(150000);
    expect(v.check.heapsChecked).toBeGreaterThan(50); // catalogs and TOAST tables too
    expect(v.check.indexesChecked).toBeGreaterThan(50);
    const rows = Object.fromEntries(v.check.tables.map((t: any) => [`${t.database}/${t.schema}.${t.table}`, Number(t.rows)]));
    expect(rows).toMatchObject({ 'postgres/public.accounts': ROWS, 'postgres/audit.events': 7 });
    await expectNoMount();

    const show = await applianceCmd(appl.dataDir, ['images', 'show', goodImage]);
    expect(show.stdout).toMatch(/restorable: {2}verified OK .* on db2: \d+ tables, \d+ rows/);
    const showJson = await applianceCmd(appl.dataDir, ['images', 'show', goodImage, '--json']);
    expect(showJson.json.restoreVerification).toMatchObject({ ok: true, agent: 'db2', mountId: v.mountId });
    // The mount's writes (the amcheck extension) never reached the image.
    const chunks = await applianceCmd(appl.dataDir, ['verify', goodImage, '--json']);
    expect(chunks.exitCode, chunks.stderr).toBe(0);
  }, 240_000);

  it('an image with a damaged index page: amcheck finds it, exit 1, recorded FAILED naming the index; nothing left mounted', async () => {
    const r = await applianceCmd(appl.dataDir, ['verify', badImage, '--restore', '--on', 'db2', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(1);
    const v = r.json;
    expect(v.ok).toBe(false);
    expect(v.check.ok).toBe(false);
    expect(v.check.problems.map((p: any) => p.relation)).toContain('accounts_pkey');
    expect(v.reason).toContain('accounts_pkey');
    // The heap is intact: its rows are still counted.
    expect(v.check.tables.find((t: any) => t.table === 'accounts')?.rows).toBe(ROWS);
    await expectNoMount();
    const show = await applianceCmd(appl.dataDir, ['images', 'show', badImage]);
    expect(show.stdout).toMatch(/restorable: {2}verification FAILED .* on db2: check found \d+ problem\(s\): postgres\/accounts_pkey: /);
    // The store's copy is what the source held: chunk verification is clean, only the restore check tells.
    expect((await applianceCmd(appl.dataDir, ['verify', badImage, '--json'])).exitCode).toBe(0);
    // The clean image keeps its own result.
    expect((await applianceCmd(appl.dataDir, ['images', 'show', goodImage, '--json'])).json.restoreVerification.ok).toBe(true);
  }, 240_000);

  it('an image PostgreSQL cannot start on: the mount fails, exit 1, recorded FAILED with PostgreSQL\'s reason; nothing left mounted', async () => {
    const r = await applianceCmd(appl.dataDir, ['verify', brokenImage, '--restore', '--on', 'db2', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(1);
    expect(r.json).toMatchObject({ ok: false, check: null });
    expect(r.json.reason).toMatch(/^mount failed: E_PG: .*exited.*control file/s);
    await expectNoMount();
    const show = await applianceCmd(appl.dataDir, ['images', 'show', brokenImage, '--json']);
    expect(show.json.restoreVerification).toMatchObject({ ok: false, reason: r.json.reason });
  }, 240_000);

  it('usage: --restore without --on, or --on without --restore, exits 2; an unknown agent fails without a record', async () => {
    expect((await applianceCmd(appl.dataDir, ['verify', goodImage, '--restore'])).exitCode).toBe(2);
    expect((await applianceCmd(appl.dataDir, ['verify', goodImage, '--on', 'db2'])).exitCode).toBe(2);
    const r = await applianceCmd(appl.dataDir, ['verify', goodImage, '--restore', '--on', 'nobody']);
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toContain('nobody');
  }, 60_000);
});

