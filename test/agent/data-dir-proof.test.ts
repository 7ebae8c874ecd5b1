/**
 * The data directory a job reads WAL from is proven to be the server's
 * (agent/pg/data-dir-proof.ts), with real PostgreSQL: the server's own
 * directory passes, configured or asked; another cluster's, a stale copy of
 * the server's own (same system identifier), and a directory without
 * pg_control are E_CONFIG naming both sides — and a capture configured so
 * fails before anything is held. Before the proof, walFacts took any of them
 * and the image carried another database's WAL.
 */
import { chmod, mkdir, mkdtemp, realpath, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { capture } from '../../agent/capture.js';
import { readControlFacts } from '../../agent/pg/data-dir-proof.js';
import { FakeDatabase, FakeQuiescer } from '../../agent/pg/testing/fake-quiescer.js';
import { walFacts } from '../../agent/pg/wal-capture.js';
import { FakeSnapshotProvider, FakeVolume } from '../../agent/snapshot/testing/fake-snapshot-provider.js';
import { isBlocksnapError } from '../../proto/errors.js';
import { createLogger } from '../../proto/shared/log.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { findPgServers } from '../../scripts/lab/version-lab.js';

const builds = await findPgServers();
const pg15 = builds.find((b) => b.major === '15');
if (!pg15) throw new Error('PostgreSQL 15 is part of the lab (/usr/lib/postgresql/15/bin)');

const undo: Array<() => Promise<unknown>> = [];
let root: string;
let server: PgCluster;
let other: PgCluster;
let staleCopy: string;

beforeAll(async () => {
  root = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-datadir-proof-')));
  undo.push(() => rm(root, { recursive: true, force: true }));
  await chmod(root, 0o755);
  server = new PgCluster({ dataDir: path.join(root, 'server'), binDir: pg15.binDir });
  undo.push(() => server.destroy());
  await server.initdb();
  await server.start();
  // A cluster of its own (own initdb: its own system identifier), never started.
  other = new PgCluster({ dataDir: path.join(root, 'other'), binDir: pg15.binDir, template: false });
  await other.initdb();
  // A copy of the server's own directory, then the server moves on: same system, older checkpoint.
  staleCopy = path.join(root, 'stale');
  await execa('cp', ['-a', server.dataDir, staleCopy]);
  await server.query('CREATE TABLE t AS SELECT generate_series(1, 1000) AS i');
  await server.query('CHECKPOINT');
}, 180_000);

afterAll(async () => {
  for (const f of undo.reverse()) await f().catch(() => undefined);
}, 60_000);

async function refusal(p: Promise<unknown>): Promise<{ code: string; message: string }> {
  return p.then(() => ({ code: 'resolved', message: '' }), (e) => ({ code: isBlocksnapError(e) ? e.code : 'other', message: String((e as Error).message) }));
}

describe('walFacts proves the data directory is the server\'s (PostgreSQL 15)', () => {
  it('the server\'s own directory: proven, asked from the server or configured', async () => {
    const asked = await walFacts(server.connectionConfig());
    expect(asked).toMatchObject({ dataDirectory: server.dataDir, walDir: path.join(server.dataDir, 'pg_wal'), proven: true });
    expect((await walFacts(server.connectionConfig(), server.dataDir)).proven).toBe(true);
  });

  it('another cluster\'s directory: E_CONFIG naming both systems', async () => {
    const here = await readControlFacts(other.dataDir);
    const theirs = await readControlFacts(server.dataDir);
    expect(here.systemIdentifier).not.toBe(theirs.systemIdentifier);
    const r = await refusal(walFacts(server.connectionConfig(), other.dataDir));
    expect(r.code).toBe('E_CONFIG');
    expect(r.message).toContain(`${other.dataDir} is not the data directory of PostgreSQL at`);
    expect(r.message).toContain(`system ${here.systemIdentifier}`);
    expect(r.message).toContain(`system ${theirs.systemIdentifier}`);
  });

  it('a stale copy of the server\'s own directory (same system, older checkpoint): E_CONFIG', async () => {
    const r = await refusal(walFacts(server.connectionConfig(), staleCopy));
    expect(r.code).toBe('E_CONFIG');
    expect(r.message).toContain('the same cluster\'s system: a copy, or another node of it');
  });

  it('a directory without pg_control: E_CONFIG', async () => {
    const empty = path.join(root, 'empty');
    await mkdir(empty);
    const r = await refusal(walFacts(server.connectionConfig(), empty));
    expect(r).toMatchObject({ code: 'E_CONFIG' });
    expect(r.message).toMatch(/is not a readable PostgreSQL data directory: .*global\/pg_control/);
  });

  it('a capture configured with another cluster\'s directory fails before anything is held', async () => {
    const volume = new FakeVolume('proof', 4 << 20);
    const provider = new FakeSnapshotProvider(path.join(root, 'snaps'), [volume]);
    const db = new FakeDatabase('primary');
    const c = server.connectionConfig();
    const r = await refusal(capture({
      jobId: 'proof-1', volume: volume.spec, provider, quiescer: () => new FakeQuiescer(db), log: createLogger('test-proof', 'silent'),
      postgres: { host: String(c.host), port: Number(c.port), user: String(c.user), database: 'postgres', role: 'auto', fast: true, pauseTimeoutMs: 1000, watchdogSeconds: 60, dataDirectory: other.dataDir },
    }));
    expect(r.code).toBe('E_CONFIG');
    expect(await provider.list()).toEqual([]);
    expect(db.held.size).toBe(0);
    expect(db.completed).toHaveLength(0);
  });
});

describe('readControlFacts: pg_control\'s first fields, across versions', () => {
  it('PostgreSQL 15: as its own pg_controldata prints them', async () => {
    const out = String((await execa(path.join(pg15.binDir, 'pg_controldata'), [server.dataDir], { env: { LC_ALL: 'C' } })).stdout);
    const facts = await readControlFacts(server.dataDir);
    expect(facts.systemIdentifier).toBe(/^Database system identifier:\s+(\d+)$/m.exec(out)?.[1]);
    expect(facts.checkpoint).toBe(/^Latest checkpoint location:\s+(\S+)$/m.exec(out)?.[1]);
  });

  // The lab's other builds have no pg_controldata: the running server's own report is the reference.
  for (const major of ['10', '18']) {
    it(`PostgreSQL ${major}: a running server's own directory is proven (the same fields at the same offsets)`, async () => {
      const b = builds.find((x) => x.major === major);
      if (!b) throw new Error(`PostgreSQL ${major} is part of the lab`);
      const c = new PgCluster({ dataDir: path.join(root, `pg${major}`), binDir: b.binDir });
      undo.push(() => c.destroy());
      await c.initdb();
      await c.start();
      await c.query('CHECKPOINT');
      expect(await walFacts(c.connectionConfig())).toMatchObject({ dataDirectory: c.dataDir, proven: true });
      expect((await refusal(walFacts(c.connectionConfig(), other.dataDir))).code).toBe('E_CONFIG');
    }, 120_000);
  }
});
