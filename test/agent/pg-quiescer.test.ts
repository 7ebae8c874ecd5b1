/**
 * PgQuiescer against real PostgreSQL servers: every version the version lab
 * finds as a primary; streaming standbys on 13 (pause shown only as a flag),
 * 15 (pg_basebackup) and 18 (built from a blocksnap image with prepare).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, readFile, realpath, rm, stat, writeFile, chmod, readdir } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { prepareDataDir } from '../../agent/pg/prepare.js';
import { encodeQuiesceState, PgQuiescer, quiesceStatePath, readQuiesceState, type PgQuiescerOptions, type QuiesceState } from '../../agent/pg/pg-quiescer.js';
import { isLsn, parseLsn, timelineOfWalFile, walFileName } from '../../agent/pg/sql-table.js';
import { chownTo, findPgServers, PG15_CLIENT_BIN, type PgServerBuild } from '../../scripts/lab/version-lab.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import { isBlocksnapError } from '../../proto/errors.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const builds = await findPgServers();
const STANDBY_MAJORS = ['13', '15', '18'];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
let root: string;
let seq = 0;

beforeAll(async () => {
  root = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-pgq-')));
  await chmod(root, 0o755);
});
afterAll(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string }> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e) => e as Error,
  );
}

function app(): string {
  return `bsq-test-${process.pid}-${seq++}`;
}

function quiescer(c: PgCluster, role: PgQuiescerOptions['role'], extra: Partial<PgQuiescerOptions> = {}): PgQuiescer {
  return new PgQuiescer({ connection: { ...c.connectionConfig(), application_name: app() }, role, ...extra });
}

async function sessionsOf(c: PgCluster, appName: string): Promise<number> {
  const rows = await c.query<{ n: string }>('SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = $1', [appName]);
  return Number(rows[0]!.n);
}

/** Sessions of `appName` once the server has finished ending closed ones (a backend exits asynchronously). */
async function settledSessions(c: PgCluster, appName: string): Promise<number> {
  await waitFor(`${appName} sessions to end`, 3000, async () => (await sessionsOf(c, appName)) === 0).catch(() => undefined);
  return sessionsOf(c, appName);
}

/** A primary's archive directory (archive_command copies every WAL and backup history file there). */
function archiveOf(c: PgCluster): string {
  return `${c.dataDir}.archive`;
}

/** The backup history file a primary wrote for `label` at the stop, once archived (5 s at most). */
async function historyFileOf(c: PgCluster, label: string): Promise<string | undefined> {
  const end = Date.now() + 5000;
  do {
    for (const name of (await readdir(archiveOf(c))).filter((n) => n.endsWith('.backup'))) {
      const text = await readFile(path.join(archiveOf(c), name), 'utf8');
      if (text.includes(`\nLABEL: ${label}\n`)) return text;
    }
    await sleep(50);
  } while (Date.now() < end);
  return undefined;
}

async function pauseState(c: PgCluster, major: number): Promise<string> {
  if (major >= 14) return (await c.query<{ s: string }>('SELECT pg_get_wal_replay_pause_state() AS s'))[0]!.s;
  return (await c.query<{ p: boolean }>('SELECT pg_is_wal_replay_paused() AS p'))[0]!.p ? 'paused (flag)' : 'not paused';
}

async function waitFor(what: string, ms: number, fn: () => Promise<boolean>): Promise<void> {
  const end = Date.now() + ms;
  while (!(await fn())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

async function newCluster(b: PgServerBuild, name: string): Promise<PgCluster> {
  const dataDir = path.join(root, `${name}-${b.major}`);
  await mkdir(`${dataDir}.archive`);
  await chownTo(`${dataDir}.archive`);
  const c = new PgCluster({ dataDir, binDir: b.binDir, settings: { archive_mode: 'on', archive_command: `cp %p ${dataDir}.archive/%f` } });
  await c.initdb();
  await c.start();
  return c;
}

/** A streaming standby: pg_basebackup (15 clients) up to 15, else a blocksnap image of the primary + prepare --as-standby. */
async function newStandby(b: PgServerBuild, primary: PgCluster, settings: Record<string, string>): Promise<PgCluster> {
  const dir = path.join(root, `standby-${b.major}`);
  const conninfo = `host=127.0.0.1 port=${primary.port} user=postgres application_name=standby${b.major}`;
  if (b.versionNum < 160000) {
    await mkdir(dir, { mode: 0o700 });
    await chownTo(dir);
    const { uid, gid } = await stat(dir);
    const r = await execa(path.join(PG15_CLIENT_BIN, 'pg_basebackup'), ['-D', dir, '-d', conninfo, '-X', 'stream', '-c', 'fast'], { uid, gid, cwd: '/', reject: false });
    if (r.exitCode !== 0) throw new Error(`pg_basebackup: ${r.stderr}`);
    // Not -R: the 15 client writes libpq options (sslsni, …) an older server's walreceiver rejects.
    await writeFile(path.join(dir, 'postgresql.auto.conf'), `primary_conninfo = '${conninfo}'\n`, { flag: 'a' });
    await writeFile(path.join(dir, 'standby.signal'), '');
    await chownTo(path.join(dir, 'standby.signal'));
  } else {
    const q = quiescer(primary, 'primary');
    await q.connect();
    await q.quiesce({ label: 'standby-seed', fast: true });
    try {
      await execa('cp', ['-a', primary.dataDir, dir]);
    } catch (e) {
      await q.close();
      throw e;
    }
    const img = await q.unquiesce();
    await q.close();
    await prepareDataDir(dir, { labelFile: img.labelFile!, spcmapFile: img.spcmapFile, stopLsn: img.stopLsn!, timeline: img.timeline, version: img.version, asStandby: true, primaryConninfo: conninfo });
  }
  const s = new PgCluster({ dataDir: dir, binDir: b.binDir, settings });
  await s.start();
  return s;
}

describe('quiesce record (STATE/pg-quiesce/<key>.json)', () => {
  const rec: QuiesceState = {
    format: 'blocksnap-pg-quiesce', version: 1, label: 'job-1', createdAt: '2026-01-02T03:04:05.006Z', agentPid: 42, agentStartTime: '777',
    server: { host: '10.0.0.5', port: 5433, database: 'postgres', user: 'backup', systemIdentifier: '7300000000000000001', version: 150010, role: 'standby' },
    exclusiveBackup: false, replayPaused: true,
  };

  it('is pinned byte by byte, whatever the key order of the object given', async () => {
    const reversed = <T extends object>(o: T) => Object.fromEntries(Object.entries(o).reverse()) as T;
    const shuffled = { ...reversed(rec), server: reversed(rec.server) };
    expect(encodeQuiesceState(shuffled)).toBe(
      '{\n  "format": "blocksnap-pg-quiesce",\n  "version": 1,\n  "label": "job-1",\n  "createdAt": "2026-01-02T03:04:05.006Z",\n' +
        '  "agentPid": 42,\n  "agentStartTime": "777",\n  "server": {\n    "host": "10.0.0.5",\n    "port": 5433,\n    "database": "postgres",\n' +
        '    "user": "backup",\n    "systemIdentifier": "7300000000000000001",\n    "version": 150010,\n    "role": "standby"\n  },\n' +
        '  "exclusiveBackup": false,\n  "replayPaused": true\n}\n',
    );
    const file = path.join(root, 'rec.json');
    await writeFile(file, encodeQuiesceState(rec));
    expect(await readQuiesceState(file)).toEqual(rec);
    await writeFile(file, JSON.stringify({ ...rec, version: 2 }));
    expect(isBlocksnapError(await rejection(readQuiesceState(file)), 'E_FORMAT')).toBe(true);
    expect(await readQuiesceState(path.join(root, 'absent.json'))).toBeUndefined();
  });

  it('is named after the server, or the key given', () => {
    expect(quiesceStatePath('/s', { host: '/var/run/postgresql', port: 5432 })).toBe('/s/pg-quiesce/_var_run_postgresql-5432.json');
    expect(quiesceStatePath('/s', { host: 'db1', port: 5432 }, 'main pg')).toBe('/s/pg-quiesce/main_pg.json');
  });
});

describe('unreachable server', () => {
  it('connect fails with a clear E_PG', async () => {
    const port = await new Promise<number>((resolve) => {
      const srv = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (srv.address() as net.AddressInfo).port;
        srv.close(() => resolve(p));
      });
    });
    const q = new PgQuiescer({ connection: { host: '127.0.0.1', port, user: 'postgres', database: 'postgres' }, role: 'auto' });
    const e = await rejection(q.connect());
    expect(isBlocksnapError(e, 'E_PG')).toBe(true);
    expect(e.message).toMatch(new RegExp(`cannot connect to PostgreSQL at 127\\.0\\.0\\.1:${port} as postgres: .*ECONNREFUSED`));
    expect((await q.close()).failed).toEqual([]);
  });
});

it('the version lab finds the Debian 15 build and the npm matrix', () => {
  const majors = builds.map((b) => b.major);
  if (!process.env.BLOCKSNAP_PG_VERSIONS) expect(majors).toEqual(expect.arrayContaining(['10', '12', '14', '15', '16', '17', '18']));
  expect(builds.find((b) => b.major === '15')?.source ?? 'system').toBe('system');
});

describe.each(builds)('primary, PostgreSQL $version', (b) => {
  let c: PgCluster;
  beforeAll(async () => {
    c = await newCluster(b, 'primary');
  });
  afterAll(async () => {
    await c?.destroy();
  });

  it('quiesce/unquiesce returns the label, LSNs and timeline the server recorded', async () => {
    const q = quiescer(c, 'primary');
    const info = await q.connect();
    expect(info).toMatchObject({ version: b.versionNum, major: b.major, role: 'primary' });
    const label = `bsq-${b.major}-${seq++}`;
    const qi = await q.quiesce({ label, fast: true });
    expect(qi).toMatchObject({ role: 'primary', backup: true, exclusive: false, replayLsn: null });
    await c.query('CREATE TABLE IF NOT EXISTS during(x int); INSERT INTO during SELECT generate_series(1, 1000)');
    const r = await q.unquiesce();
    await q.close();

    expect(isLsn(r.startLsn) && isLsn(r.stopLsn)).toBe(true);
    expect(r.startLsn).toBe(qi.startLsn);
    expect(r.labelFile).toMatch(new RegExp(`^START WAL LOCATION: ${r.startLsn} \\(file [0-9A-F]{24}\\)\\n`));
    expect(r.labelFile).toContain(`\nLABEL: ${label}\n`);
    expect(r.labelFile).toContain(b.versionNum >= 140000 ? '\nBACKUP FROM: primary\n' : '\nBACKUP FROM: master\n');
    expect(parseLsn(r.stopLsn!) > parseLsn(r.startLsn!)).toBe(true);
    expect(r).toMatchObject({ exclusive: false, version: b.versionNum, role: 'primary', timeline: 1, pausedSeconds: 0, spcmapFile: '' });
    expect(r.backupSeconds).toBeGreaterThan(0);
    // The server's own record of this backup agrees on start and stop.
    const history = await historyFileOf(c, label);
    expect(history).toContain(`START WAL LOCATION: ${r.startLsn} `);
    expect(history).toContain(`STOP WAL LOCATION: ${r.stopLsn} `);
    expect(await settledSessions(c, (q as any).opts.connection.application_name)).toBe(0);
  });

  it('abort stops the backup and keeps the session usable; close ends it', async () => {
    const q = quiescer(c, 'primary');
    const appName = (q as any).opts.connection.application_name as string;
    await q.connect();
    const label = `bsq-abort-${seq++}`;
    await q.quiesce({ label, fast: true });
    const report = await q.abort('test');
    expect(report).toEqual({ released: ['stopped backup'], failed: [] });
    expect(await historyFileOf(c, label)).toContain('STOP WAL LOCATION');
    expect(await q.abort('again')).toEqual({ released: [], failed: [] });
    // Same session: a second backup may start only if the first one really ended.
    await q.quiesce({ label: `${label}-2`, fast: true });
    expect((await q.unquiesce()).labelFile).toContain(`LABEL: ${label}-2\n`);
    expect(await sessionsOf(c, appName)).toBe(1);
    await q.close();
    expect(await settledSessions(c, appName)).toBe(0);
  });

  it('configured as a standby: E_PG, nothing left open', async () => {
    const q = quiescer(c, 'standby');
    const e = await rejection(q.connect());
    expect(isBlocksnapError(e, 'E_PG')).toBe(true);
    expect(e.message).toMatch(/is a primary \(not in recovery\), but it is configured as a standby/);
    expect(await settledSessions(c, (q as any).opts.connection.application_name)).toBe(0);
  });

  it('names WAL files like the server', async () => {
    const [row] = await c.query<{ lsn: string; name: string; seg: string }>(
      "SELECT pg_current_wal_lsn()::text AS lsn, pg_walfile_name(pg_current_wal_lsn()) AS name, current_setting('wal_segment_size') AS seg",
    );
    const segBytes = /MB$/.test(row!.seg) ? parseInt(row!.seg, 10) << 20 : Number(row!.seg) * 8192;
    const lsn = parseLsn(row!.lsn);
    // pg_walfile_name names the segment of the byte *before* a segment boundary.
    if (lsn % BigInt(segBytes) !== 0n) expect(walFileName(1, lsn, segBytes)).toBe(row!.name);
    expect(timelineOfWalFile(row!.name)).toBe(1);
  });
});

const pg15 = builds.find((b) => b.major === '15');
describe.runIf(pg15)('primary, PostgreSQL 15: bad input and the watchdog', () => {
  let c: PgCluster;
  beforeAll(async () => {
    c = await newCluster(pg15!, 'bad');
  });
  afterAll(async () => {
    await c?.destroy();
  });

  it('wrong password: E_PG naming the authentication failure', async () => {
    await c.query("CREATE ROLE bs_pw LOGIN PASSWORD 'right'");
    const hba = path.join(c.dataDir, 'pg_hba.conf');
    await writeFile(hba, `host all bs_pw 127.0.0.1/32 scram-sha-256\n${await readFile(hba, 'utf8')}`);
    // A new backend sees the postmaster's reload time once it has reloaded (pg_hba.conf included).
    const loadedAt = async () => (await c.query<{ t: Date }>('SELECT pg_conf_load_time() AS t'))[0]!.t.getTime();
    const before = await loadedAt();
    await c.query('SELECT pg_reload_conf()');
    await waitFor('the server to reload pg_hba.conf', 10_000, async () => (await loadedAt()) > before);
    const q = new PgQuiescer({ connection: { ...c.connectionConfig(), user: 'bs_pw', password: 'wrong' }, role: 'primary' });
    const e = await rejection(q.connect());
    expect(isBlocksnapError(e, 'E_PG')).toBe(true);
    expect(e.message).toMatch(/as bs_pw: password authentication failed .*\[28P01\] \(authentication failed/);
  });

  it('watchdog stops the backup when unquiesce never comes', async () => {
    const q = quiescer(c, 'primary', { watchdogSeconds: 1 });
    await q.connect();
    const label = `bsq-watchdog-${seq++}`;
    await q.quiesce({ label, fast: true });
    await waitFor('the watchdog stop', 5000, async () => (await historyFileOf(c, label)) !== undefined);
    const e = await rejection(q.unquiesce());
    expect(isBlocksnapError(e, 'E_TIMEOUT')).toBe(true);
    expect(e.message).toMatch(/watchdog released the quiesce after 1 s/);
    await q.quiesce({ label: `${label}-after`, fast: true });
    await q.unquiesce();
    await q.close();
  });

  it('a backup start that blocks (spread checkpoint): E_TIMEOUT, or E_CANCELLED by abort; session gone; next start works', async () => {
    await c.query("ALTER SYSTEM SET checkpoint_timeout = '1h'");
    await c.query('ALTER SYSTEM SET checkpoint_completion_target = 0.9');
    await c.query('SELECT pg_reload_conf()');
    try {
      await c.query('CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 8) AS pad FROM generate_series(1, 60000) g');
      const q = quiescer(c, 'primary', { startTimeoutMs: 1500 });
      const appName = (q as any).opts.connection.application_name as string;
      await q.connect();
      const t0 = Date.now();
      const e = await rejection(q.quiesce({ label: `bsq-slow-${seq++}`, fast: false }));
      expect(isBlocksnapError(e, 'E_TIMEOUT')).toBe(true);
      expect(e.message).toMatch(/quiesce failed: backup start did not complete: SELECT pg_backup_start.*canceling statement due to statement timeout \[57014\]/);
      expect(Date.now() - t0).toBeLessThan(10_000);
      expect(await settledSessions(c, appName)).toBe(0);
      await q.close();
      // Same blocked start, cut short by abort (a cancelled job) instead of the timeout.
      const qa = quiescer(c, 'primary');
      await qa.connect();
      const pending = rejection(qa.quiesce({ label: `bsq-cancel-${seq++}`, fast: false }));
      // Aborted while the server is inside the blocked start, not before it was sent.
      await waitFor('the backup start to be running', 10_000, async () => Number((await c.query<{ n: string }>(
        "SELECT count(*)::text AS n FROM pg_stat_activity WHERE application_name = $1 AND state = 'active' AND query ILIKE '%pg_backup_start%'",
        [(qa as any).opts.connection.application_name]))[0]!.n) > 0);
      const t1 = Date.now();
      await qa.abort('job cancelled');
      const ea = await pending;
      expect(isBlocksnapError(ea, 'E_CANCELLED'), ea.message).toBe(true);
      expect(Date.now() - t1).toBeLessThan(5000);
      expect(await settledSessions(c, (qa as any).opts.connection.application_name)).toBe(0);
      await qa.close();
      const q2 = quiescer(c, 'primary');
      await q2.connect();
      await q2.quiesce({ label: `bsq-after-slow-${seq++}`, fast: true });
      expect(isLsn((await q2.unquiesce()).stopLsn)).toBe(true);
      await q2.close();
    } finally {
      await c.query('ALTER SYSTEM RESET ALL');
      await c.query('SELECT pg_reload_conf()');
    }
  });
});

describe.each(builds.filter((b) => STANDBY_MAJORS.includes(b.major)))('standby, PostgreSQL $version', (b) => {
  const major = Number(b.major);
  let p: PgCluster;
  let s: PgCluster;
  let stateDir: string;
  let child: ChildProcess | undefined;
  beforeAll(async () => {
    p = await newCluster(b, 'sprimary');
    await p.query('CREATE TABLE t(id int)');
    // A conflicting standby query then blocks replay for good (the "never pauses" case).
    s = await newStandby(b, p, { max_standby_streaming_delay: '-1', hot_standby_feedback: 'off' });
    stateDir = path.join(root, `state-${b.major}`);
  });
  afterAll(async () => {
    if (child?.exitCode === null) child.kill('SIGKILL');
    await s?.destroy();
    await p?.destroy();
  });

  async function caughtUp(): Promise<void> {
    const [{ lsn }] = (await p.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')) as [{ lsn: string }];
    await waitFor('the standby to catch up', 15_000, async () => {
      const [r] = await s.query<{ lsn: string | null }>('SELECT pg_last_wal_replay_lsn()::text AS lsn');
      return r!.lsn !== null && parseLsn(r!.lsn) >= parseLsn(lsn);
    });
  }

  it('pauses replay for real while quiesced, records a standby label, then resumes', async () => {
    await caughtUp();
    const q = quiescer(s, 'standby', { stateDir });
    expect((await q.connect()).role).toBe('standby');
    const label = `bsq-standby-${seq++}`;
    const qi = await q.quiesce({ label, fast: true });
    expect(qi).toMatchObject({ role: 'standby', backup: true, exclusive: false });
    expect(isLsn(qi.replayLsn)).toBe(true);
    expect(await pauseState(s, major)).toBe(major >= 14 ? 'paused' : 'paused (flag)');
    const file = quiesceStatePath(stateDir, (q as any).opts.connection);
    expect(JSON.parse(await readFile(file, 'utf8'))).toMatchObject({ label, replayPaused: true, exclusiveBackup: false });

    // WAL keeps arriving but is not applied while paused.
    await p.query('INSERT INTO t VALUES (1)');
    const [{ lsn: primaryLsn }] = (await p.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn')) as [{ lsn: string }];
    await waitFor('WAL to arrive', 10_000, async () => {
      const [r] = await s.query<{ lsn: string | null }>('SELECT pg_last_wal_receive_lsn()::text AS lsn');
      return r!.lsn !== null && parseLsn(r!.lsn) >= parseLsn(primaryLsn);
    });
    // The startup process sits in its pause loop: the WAL above would have been applied by now.
    await waitFor('replay to sit in its pause', 10_000, async () => Number((await s.query<{ n: string }>(
      "SELECT count(*)::text AS n FROM pg_stat_activity WHERE backend_type = 'startup' AND wait_event = 'RecoveryPause'"))[0]!.n) === 1);
    const [still] = await s.query<{ lsn: string; n: string }>('SELECT pg_last_wal_replay_lsn()::text AS lsn, (SELECT count(*) FROM t) AS n');
    expect(still).toEqual({ lsn: qi.replayLsn, n: '0' });

    const r = await q.unquiesce();
    expect(r).toMatchObject({ role: 'standby', exclusive: false, timeline: 1, replayLsn: qi.replayLsn, version: b.versionNum });
    expect(r.labelFile).toContain('\nBACKUP FROM: standby\n');
    expect(r.labelFile).toContain(`\nLABEL: ${label}\n`);
    // The stop point is the standby's minRecoveryPoint: never past what was replayed, so the snapshot holds its WAL.
    expect(parseLsn(r.stopLsn!) <= parseLsn(qi.replayLsn!)).toBe(true);
    expect(parseLsn(r.stopLsn!) >= parseLsn(r.startLsn!)).toBe(true);
    expect(r.pausedSeconds).toBeGreaterThan(0);
    expect(await pauseState(s, major)).toBe('not paused');
    await waitFor('replay to apply the insert', 10_000, async () => (await s.query<{ n: string }>('SELECT count(*) AS n FROM t'))[0]!.n === '1');
    await expect(stat(file)).rejects.toThrow(/ENOENT/);
    await q.close();
  });

  it('configured as a primary: E_PG, replay untouched, nothing open', async () => {
    const q = quiescer(s, 'primary');
    const e = await rejection(q.connect());
    expect(isBlocksnapError(e, 'E_PG')).toBe(true);
    expect(e.message).toMatch(/is a standby \(in recovery\), but it is configured as a primary/);
    expect(await pauseState(s, major)).toBe('not paused');
    expect(await settledSessions(s, (q as any).opts.connection.application_name)).toBe(0);
  });

  it('abort resumes replay and ends the standby backup', async () => {
    const q = quiescer(s, 'standby', { stateDir });
    await q.connect();
    await q.quiesce({ label: `bsq-sabort-${seq++}`, fast: true });
    expect(await pauseState(s, major)).not.toBe('not paused');
    const report = await q.abort('test');
    expect(report).toEqual({ released: ['stopped backup', 'resume replay'], failed: [] });
    expect(await pauseState(s, major)).toBe('not paused');
    await q.quiesce({ label: `bsq-sabort-${seq++}`, fast: true });
    await q.unquiesce();
    await q.close();
  });

  it('watchdog resumes replay', async () => {
    const q = quiescer(s, 'standby', { watchdogSeconds: 1 });
    await q.connect();
    await q.quiesce({ label: `bsq-swd-${seq++}`, fast: true });
    await waitFor('the watchdog to resume replay', 5000, async () => (await pauseState(s, major)) === 'not paused');
    expect(isBlocksnapError(await rejection(q.unquiesce()), 'E_TIMEOUT')).toBe(true);
    await q.close();
  });

  it.runIf(major >= 14)('replay that never pauses: E_TIMEOUT (or E_CANCELLED by abort), then resumed', async () => {
    await caughtUp();
    const reader = new (await import('pg')).default.Client(s.connectionConfig());
    await reader.connect();
    try {
      await reader.query('BEGIN; SELECT count(*) FROM t');
      await p.query('BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE; COMMIT');
      // Replay is blocked once the startup process waits for the lock the reader holds off.
      await waitFor('replay to wait for the ACCESS EXCLUSIVE lock', 10_000, async () => Number((await s.query<{ n: string }>(
        "SELECT count(*)::text AS n FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND NOT granted"))[0]!.n) > 0);
      const q = quiescer(s, 'standby', { pauseTimeoutMs: 1500 });
      await q.connect();
      const e = await rejection(q.quiesce({ label: `bsq-stuck-${seq++}`, fast: true }));
      expect(isBlocksnapError(e, 'E_TIMEOUT')).toBe(true);
      expect(e.message).toMatch(/replay did not pause within 1500 ms \(state pause requested/);
      expect(await pauseState(s, major)).toBe('not paused');
      // The same wait, cut short by abort.
      const pending = rejection(q.quiesce({ label: `bsq-stuck-${seq++}`, fast: true }));
      await waitFor('the pause to be requested', 10_000, async () => (await pauseState(s, major)) === 'pause requested');
      await q.abort('job cancelled');
      const ea = await pending;
      expect(isBlocksnapError(ea, 'E_CANCELLED'), ea.message).toBe(true);
      expect(await pauseState(s, major)).toBe('not paused');
      await q.close();
    } finally {
      await reader.query('ROLLBACK').catch(() => undefined);
      await reader.end();
    }
    await caughtUp();
  });

  it.runIf(major === 15)('a killed agent leaves replay paused; releaseStale resumes it', async () => {
    const script = path.join(root, 'hold-quiesce.mts');
    const conn = { ...s.connectionConfig(), application_name: app() };
    await writeFile(script, [
      `import { PgQuiescer } from ${JSON.stringify(path.join(repo, 'agent/pg/pg-quiescer.ts'))};`,
      `const q = new PgQuiescer({ connection: ${JSON.stringify(conn)}, role: 'standby', stateDir: ${JSON.stringify(stateDir)} });`,
      `await q.connect(); await q.quiesce({ label: 'killed-agent', fast: true });`,
      `console.log('QUIESCED'); setInterval(() => {}, 1000);`,
    ].join('\n'));
    // node itself with tsx's loader: the tsx CLI would put a second process between us and the quiescer.
    child = spawn(process.execPath, ['--import', 'tsx', script], { cwd: repo, stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child!.stdout!.on('data', (d: Buffer) => d.toString().includes('QUIESCED') && resolve());
      child!.on('exit', (code) => reject(new Error(`child exited ${code}`)));
    });
    child.kill('SIGKILL');
    await new Promise((r) => child!.once('exit', r));
    await waitFor('the killed session to end', 10_000, async () => (await sessionsOf(s, conn.application_name)) === 0);
    // The pause is server-wide: it outlives the agent.
    expect(await pauseState(s, major)).toBe('paused');
    // A record that names another system (a stale file, another cluster now on this address) is not acted on.
    const file = quiesceStatePath(stateDir, conn);
    const original = await readFile(file, 'utf8');
    const rec = (await readQuiesceState(file))!;
    expect(rec.server.systemIdentifier).toMatch(/^\d+$/);
    const other = (BigInt(rec.server.systemIdentifier!) + 1n).toString();
    await writeFile(file, encodeQuiesceState({ ...rec, server: { ...rec.server, systemIdentifier: other } }));
    const refused = await rejection(PgQuiescer.releaseStale({ stateDir, connection: conn }));
    expect(isBlocksnapError(refused, 'E_PG'), refused.message).toBe(true);
    expect(refused.message).toMatch(new RegExp(`written for system ${other}, but .* is system ${rec.server.systemIdentifier}: not touching it`));
    expect(await pauseState(s, major)).toBe('paused');
    expect(await readQuiesceState(file)).toMatchObject({ server: { systemIdentifier: other } });
    await writeFile(file, original);
    const released = await PgQuiescer.releaseStale({ stateDir, connection: conn });
    expect(released).toMatchObject({ found: true, actions: ['resumed replay (was paused)'] });
    expect(await pauseState(s, major)).toBe('not paused');
    expect(await readdir(path.join(stateDir, 'pg-quiesce'))).toEqual([]);
    expect(await PgQuiescer.releaseStale({ stateDir, connection: conn })).toMatchObject({ found: false, actions: [] });
  });
});
