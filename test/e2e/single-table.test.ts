/**
 * README's single-table recovery recipe, followed literally through the real
 * CLIs (dist/: `npm run build`) and PostgreSQL 15's client tools: a table is
 * dropped on the live server after a backup; `blocksnap-agent mount IMAGE`
 * starts the image's copy beside it, `pg_dump -t` takes the table from the
 * copy, `pg_restore` loads it into the live server, `blocksnap-agent
 * unmount` ends the copy. The live server gets the table back with every row
 * of the image, its primary key and index, and keeps what was written after
 * the backup in its other tables.
 */
import { execa } from 'execa';
import { rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import type { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { agentCli } from '../../scripts/lab/processes.js';
import { e2eFixture, type E2eFixture } from '../support/e2e-fixture.js';

const PG_BIN = '/usr/lib/postgresql/15/bin';
let fx: E2eFixture;
let appl: ApplianceHarness;
let source: PgCluster;
let agent: Agent;
let imageId: string;
let config: string;
let dump: string;
let before: { n: string; total: string };

async function sh(file: string, args: string[]) {
  const r = await execa(file, args, { reject: false, stdin: 'ignore' });
  return { exitCode: r.exitCode, stdout: String(r.stdout), stderr: String(r.stderr) };
}

beforeAll(async () => {
  fx = e2eFixture();
  const lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 ** 3, name: 'pgdata' });
  source = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
  await source.query(`CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) NOT NULL);
    CREATE INDEX orders_by_customer ON orders (customer);
    INSERT INTO orders SELECT g, 'c' || (g % 97), g * 1.25 FROM generate_series(1, 5000) g;
    CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) VALUES ('before the backup')`);
  [before] = await source.query<{ n: string; total: string }>('SELECT count(*)::text AS n, sum(amount)::text AS total FROM orders');
  appl = await fx.appliance(['db1']);
  const postgres = { host: '127.0.0.1', port: source.port, user: 'postgres', role: 'primary' };
  const stateDir = join(lab.root, 'agent-db1');
  config = join(lab.root, 'db1.json');
  dump = join(lab.root, 'orders.dump');
  await writeFile(config, JSON.stringify({ appliance: appl.url, agent: 'db1', token: appl.tokens.db1!, stateDir, volumes: [lab.volume], tracking: 'tracefs', postgres }));
  agent = await fx.pgAgent({ url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir, postgres });
  const outcome = await appl.app.router.startJob('db1', 'pgdata', 'full').done;
  if (!outcome.ok) throw new Error(`backup failed: ${JSON.stringify(outcome)}`);
  imageId = outcome.imageId!;
}, 300_000);

afterAll(() => fx?.dispose(), 300_000);

describe('single-table recovery (README recipe)', () => {
  it('a dropped table comes back from the mounted image: rows, key and index; later writes elsewhere kept; nothing left mounted', async () => {
    // The accident, after the backup: the table is dropped, other work goes on.
    await source.query("DROP TABLE orders; INSERT INTO notes (body) VALUES ('after the backup')");

    // 1. mount the image beside the live server.
    const m = await sh(process.execPath, [agentCli(), 'mount', imageId, '--config', config, '--json']);
    expect(m.exitCode, m.stderr).toBe(0);
    const mount = JSON.parse(m.stdout) as { mountId: string; connection: string };
    fx.defer(`mount ${mount.mountId}`, () => agent.mounts.unmount(mount.mountId).catch(() => undefined));
    fx.defer('dump file', () => rm(dump, { force: true }));
    // 2. pg_dump -t TABLE from the copy.
    const d = await sh(join(PG_BIN, 'pg_dump'), ['-d', mount.connection, '-t', 'public.orders', '-Fc', '-f', dump]);
    expect(d.exitCode, d.stderr).toBe(0);
    // 3. pg_restore into the live server.
    const live = `host=127.0.0.1 port=${source.port} user=postgres dbname=postgres`;
    const r = await sh(join(PG_BIN, 'pg_restore'), ['-d', live, '--exit-on-error', dump]);
    expect(r.exitCode, r.stderr).toBe(0);
    // 4. unmount.
    const u = await sh(process.execPath, [agentCli(), 'unmount', mount.mountId, '--config', config]);
    expect(u.exitCode, u.stderr).toBe(0);
    expect(await agent.mounts.list()).toEqual([]);

    const [after] = await source.query<{ n: string; total: string }>('SELECT count(*)::text AS n, sum(amount)::text AS total FROM orders');
    expect(after).toEqual(before);
    const idx = await source.query<{ indexname: string }>("SELECT indexname FROM pg_indexes WHERE tablename = 'orders' ORDER BY 1");
    expect(idx.map((i) => i.indexname)).toEqual(['orders_by_customer', 'orders_pkey']);
    await expect(source.query('INSERT INTO orders VALUES (1, \'dup\', 1)')).rejects.toThrow(/duplicate key/);
    expect((await source.query<{ body: string }>('SELECT body FROM notes ORDER BY id')).map((x) => x.body)).toEqual(['before the backup', 'after the backup']);
  }, 240_000);
});
