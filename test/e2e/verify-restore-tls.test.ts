/**
 * Mounts over TLS (issue 9, NBD_OPT_STARTTLS): an appliance serving wss://
 * with a self-signed certificate for 127.0.0.1 also serves NBD with it and
 * grants say tls; the agent, trusting that certificate through its config's
 * caFile (as for wss://), attaches nbds:// with libnbd's tls-certificates=DIR
 * (DIR/ca-cert.pem written in the mount's work dir). Exercised through
 * `verify IMAGE --restore --on db1` (mount, amcheck, counts, unmount) and a
 * `mount --on` whose nbdfuse is checked to speak nbds:// with that CA.
 */
import { execa } from 'execa';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../../agent/agent.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { applianceCmd } from '../../scripts/lab/processes.js';
import { e2eFixture, type E2eFixture } from '../support/e2e-fixture.js';
import { parseConnection } from '../../agent/mount/restore-check.js';
import pg from 'pg';

async function query(connection: string, sql: string): Promise<any[]> {
  const c = new pg.Client(parseConnection(connection));
  await c.connect();
  try {
    return (await c.query(sql)).rows;
  } finally {
    await c.end();
  }
}

let fx: E2eFixture;
let appl: ApplianceHarness;
let agent: Agent;
let imageId: string;
let stateDir: string;

beforeAll(async () => {
  fx = e2eFixture();
  const dir = await mkdtemp(join(tmpdir(), 'bsn-mount-tls-'));
  fx.defer('certificate directory', () => rm(dir, { recursive: true, force: true }));
  await execa('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
    '-subj', '/CN=blocksnap-test', '-addext', 'subjectAltName=IP:127.0.0.1',
    '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'),
  ]);
  const lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 ** 3, name: 'pgdata' });
  const source = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
  await source.query('CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1234)');
  appl = await fx.appliance(['db1'], { tls: { cert: await readFile(join(dir, 'cert.pem')), key: await readFile(join(dir, 'key.pem')) } });
  expect(appl.url).toMatch(/^wss:/);
  stateDir = join(lab.root, 'agent-db1');
  agent = await fx.pgAgent({
    url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir,
    postgres: { host: '127.0.0.1', port: source.port, user: 'postgres', role: 'primary' }, extra: { caFile: join(dir, 'cert.pem') },
  });
  const outcome = await appl.app.router.startJob('db1', 'pgdata', 'full').done;
  if (!outcome.ok) throw new Error(`backup failed: ${JSON.stringify(outcome)}`);
  imageId = outcome.imageId!;
}, 300_000);

afterAll(() => fx?.dispose(), 300_000);

describe('mounts over TLS', () => {
  it('mount --on: nbdfuse attaches nbds:// trusting the configured CA; PostgreSQL answers; unmount leaves nothing', async () => {
    const r = await applianceCmd(appl.dataDir, ['mount', imageId, '--on', 'db1', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(0);
    const mountId = r.json.mountId as string;
    fx.defer(`mount ${mountId}`, () => agent.mounts.unmount(mountId).catch(() => undefined));
    const cmdlines: string[] = [];
    for (const pid of (await readdir('/proc')).filter((x) => /^\d+$/.test(x))) {
      const cmd = await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
      if (cmd.startsWith('nbdfuse\0') && cmd.includes(mountId)) cmdlines.push(cmd.replace(/\0/g, ' '));
    }
    expect(cmdlines).toHaveLength(1);
    // libnbd refuses tls-certificates in nbdfuse's URI: nbdkit's nbd plugin is the TLS client, trusting the configured CA.
    expect(cmdlines[0]).toContain(`--command nbdkit -s --exit-with-parent nbd hostname=127.0.0.1 port=${appl.app.nbdPort} export=`);
    expect(cmdlines[0]).toContain(`tls=require tls-certificates=${join(stateDir, 'mounts', `${mountId}.d`, 'tls')}`);
    expect((await query(r.json.connection, 'SELECT count(*)::int AS n FROM t'))[0]!.n).toBe(1234);
    await agent.mounts.unmount(mountId);
    expect(appl.app.mounts.mounts.get(mountId)?.state).toBe('ended');
    expect(await readdir(join(stateDir, 'mounts'))).toEqual([]);
    // No nbdfuse or nbdkit left naming the mount.
    const procs: string[] = [];
    for (const pid of (await readdir('/proc')).filter((x) => /^\d+$/.test(x))) {
      if ((await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).includes(mountId)) procs.push(pid);
    }
    expect(procs).toEqual([]);
  }, 240_000);

  it('verify --restore over TLS: OK, the table counted', async () => {
    const r = await applianceCmd(appl.dataDir, ['verify', imageId, '--restore', '--on', 'db1', '--json']);
    expect(r.exitCode, r.stderr + r.stdout).toBe(0);
    expect(r.json.ok).toBe(true);
    expect(r.json.check.tables).toContainEqual(expect.objectContaining({ table: 't', rows: 1234 }));
    expect(await agent.mounts.list()).toEqual([]);
  }, 240_000);
});
