/**
 * Starting PostgreSQL on a mounted, prepared data directory and waiting for
 * its first answer.
 *
 * The postmaster is spawned directly (not through pg_ctl: its pid is known
 * the moment it exists, so the journal holds pid + start time before the
 * first byte of recovery), as the data directory's owner, in a session of
 * its own (setsid: it outlives a killed agent until cleanupOrphans stops it),
 * with a socket directory of its own (the source's /var/run/postgresql holds
 * the source's socket and lock file) and its log next to it.
 *
 * Ready: a primary copy answers `SELECT pg_is_in_recovery()` with false
 * (recovery over, promoted, writable); a standby copy answers at all (hot
 * standby: consistent at the image's stop point). Queries go over the Unix
 * socket as the owner's role with the node client; if the copy's pg_hba
 * wants peer authentication for it (a root process is not that OS user),
 * psql is run as the owner instead.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { chown, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import pg from 'pg';
import { BlocksnapError } from '../../proto/errors.js';
import { processStartTime } from '../../proto/shared/proc.js';
import type { MountJournal } from './mount-state.js';
export { freePort } from '../../proto/shared/free-port.js';

export interface PgOwner {
  uid: number;
  gid: number;
  user: string;
}

export interface StartPgOptions {
  dataDir: string;
  binDir: string;
  port: number;
  runDir: string;
  logFile: string;
  owner: PgOwner;
  /** Extra `-c name=value` settings for this start only (not written into the copy). */
  settings: Record<string, string>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function ownerOf(uid: number, gid: number): Promise<PgOwner> {
  const line = (await readFile('/etc/passwd', 'utf8')).split('\n').find((l) => l.split(':')[2] === String(uid));
  const user = line?.split(':')[0];
  if (!user) throw new BlocksnapError('E_PG', `the data directory's owner uid ${uid} has no entry in /etc/passwd`);
  return { uid, gid, user };
}


export function postgresArgs(o: StartPgOptions): string[] {
  return ['-D', o.dataDir, '-p', String(o.port), '-k', o.runDir, ...Object.entries(o.settings).flatMap(([k, v]) => ['-c', `${k}=${v}`])];
}

export interface Postmaster {
  pid: number;
  startTime: string | null;
  /** Resolves with the exit code when the postmaster exits. */
  exited: () => number | null | undefined;
}

/** Records the postmaster step, spawns it, completes the record with pid + start time. */
export async function startPostmaster(o: StartPgOptions, journal: MountJournal): Promise<Postmaster> {
  const done = await journal.step({ kind: 'postmaster', dataDir: o.dataDir });
  const log = openSync(o.logFile, 'a', 0o600);
  let child;
  try {
    child = spawn(path.join(o.binDir, 'postgres'), postgresArgs(o), {
      uid: o.owner.uid, gid: o.owner.gid, cwd: '/', detached: true, stdio: ['ignore', log, log],
      env: { PATH: '/usr/bin:/bin', LC_ALL: 'C', LANG: 'C', TZ: 'UTC' },
    });
  } finally {
    closeSync(log);
  }
  let exited: number | null | undefined;
  const spawnError = new Promise<Error>((resolve) => child.once('error', resolve));
  child.once('exit', (code) => { exited = code; });
  child.unref();
  if (child.pid === undefined) throw new BlocksnapError('E_PG', `cannot start ${o.binDir}/postgres`, { cause: await spawnError });
  const startTime = await processStartTime(child.pid);
  await done({ pid: child.pid, startTime });
  return { pid: child.pid, startTime, exited: () => exited };
}

async function logTail(file: string): Promise<string> {
  return (await readFile(file, 'utf8').catch(() => '')).trim().split('\n').slice(-8).join('\n');
}

/** What one probe saw: null = not answering yet. */
type Seen = { inRecovery: boolean; paused: boolean } | null;
/** Runs the probe's query, or `other` (then what it saw is not a probe's answer). */
type Probe = (other?: string) => Promise<Seen>;

/** Ends a pause at the recovery target before 14 (the function's name changed in 10). */
function resumeSql(serverVersion: number): string {
  const resume = serverVersion >= 100000 ? 'pg_wal_replay_resume()' : 'pg_xlog_replay_resume()';
  return `SELECT ${resume}, true AS r, false AS p`;
}

/** In recovery, and paused (at the recovery target)? The pause function's name changed in 10. */
function probeSql(serverVersion: number): string {
  const paused = serverVersion >= 100000 ? 'pg_is_wal_replay_paused()' : 'pg_is_xlog_replay_paused()';
  return `SELECT pg_is_in_recovery() AS r, CASE WHEN pg_is_in_recovery() THEN ${paused} ELSE false END AS p`;
}

/** One query over the socket with the node client. */
function nodeProbe(o: StartPgOptions, sql: string, onAuthRefused: () => void): Probe {
  return async (other) => {
    const c = new pg.Client({ host: o.runDir, port: o.port, user: o.owner.user, database: 'postgres', application_name: 'blocksnap-mount', connectionTimeoutMillis: 5_000 });
    c.on('error', () => undefined);
    try {
      await c.connect();
      const r = await c.query<{ r: boolean; p: boolean }>(other ?? sql);
      return { inRecovery: r.rows[0]!.r, paused: r.rows[0]!.p };
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === '28000' || code === '28P01') onAuthRefused();
      return null;
    } finally {
      await c.end().catch(() => undefined);
    }
  };
}

function psqlProbe(o: StartPgOptions, sql: string, psql: string): Probe {
  return async (other) => {
    const r = await execa(psql, ['-X', '-A', '-t', '-F', ' ', '-h', o.runDir, '-p', String(o.port), '-U', o.owner.user, '-d', 'postgres', '-c', other ?? sql], {
      uid: o.owner.uid, gid: o.owner.gid, cwd: '/', reject: false, stdin: 'ignore', timeout: 10_000, extendEnv: false, env: { PATH: '/usr/bin:/bin', LC_ALL: 'C' },
    });
    if (r.exitCode !== 0) return null;
    const [rec, paused] = String(r.stdout).trim().split(' ');
    return { inRecovery: rec === 't', paused: paused === 't' };
  };
}

/**
 * Triggers promotion the way pg_ctl promote does: a `promote` file in the
 * data directory (owned by the server's user), then SIGUSR1 to the postmaster.
 */
export async function triggerPromote(o: StartPgOptions, pm: Postmaster): Promise<void> {
  const file = path.join(o.dataDir, 'promote');
  await writeFile(file, '', { mode: 0o600 });
  await chown(file, o.owner.uid, o.owner.gid);
  process.kill(pm.pid, 'SIGUSR1');
}

/** The postmaster's startup (recovery) process, once forked: its children named "postgres: startup". */
async function startupProcess(pm: Postmaster): Promise<number | null> {
  const kids = await readFile(`/proc/${pm.pid}/task/${pm.pid}/children`, 'utf8').catch(() => '');
  for (const k of kids.split(' ').filter((x) => /^\d+$/.test(x))) {
    const cmd = await readFile(`/proc/${k}/cmdline`, 'utf8').catch(() => '');
    if (cmd.startsWith('postgres: startup')) return Number(k);
  }
  return null;
}

export interface WaitOptions {
  serverVersion: number;
  /** Answer at all (standby) or out of recovery (primary). */
  standby: boolean;
  /** A primary prepared to pause at its target: promote once it is paused there. */
  promoteWhenPaused: boolean;
  timeoutMs: number;
}

/**
 * Waits until the copy answers (and, unless a standby, has left recovery,
 * promoting it once paused at its target when asked to). Fails early with
 * the server log's tail if the postmaster exits.
 */
export async function waitFirstAnswer(o: StartPgOptions, pm: Postmaster, w: WaitOptions): Promise<void> {
  let useNode = true;
  const sql = probeSql(w.serverVersion);
  const viaNode = nodeProbe(o, sql, () => { useNode = false; });
  const psql = path.join(o.binDir, 'psql');
  const viaPsql = psqlProbe(o, sql, await readFile(psql).then(() => psql, () => '/usr/bin/psql'));
  // Promotion is triggered as soon as the startup process runs, BEFORE recovery
  // pauses at the target: a trigger that arrives while it is paused is only
  // seen when its 1 s pause sleep times out (measured: ≈1 s lost), while one
  // that is already there when it reaches the target promotes at once.
  // Archive recovery (not standby mode) looks at the trigger only at that
  // pause; were it ever acted on before the image's end of backup,
  // PostgreSQL stops with "WAL ends before end of online backup": a failed
  // mount, never an inconsistent copy.
  // Before 14 a promotion request does not end a pause at the recovery target
  // (14 made promote end a pause): there, once paused, pg_wal_replay_resume()
  // ends recovery at the target (documented: resuming a paused target ends
  // recovery), and no trigger is sent.
  const promoteEndsPause = w.serverVersion >= 140000;
  let promotedAt = 0;
  const end = Date.now() + w.timeoutMs;
  for (;;) {
    if (w.promoteWhenPaused && promoteEndsPause && !promotedAt && (await startupProcess(pm)) !== null) {
      await triggerPromote(o, pm);
      promotedAt = Date.now();
    }
    const seen = await (useNode ? viaNode() : viaPsql());
    if (seen && (w.standby || !seen.inRecovery)) return;
    if (seen?.paused && w.promoteWhenPaused && Date.now() - promotedAt > 2_000) {
      // Not taken (the trigger came before the postmaster could pass it on): again.
      if (promoteEndsPause) await triggerPromote(o, pm);
      else await (useNode ? viaNode : viaPsql)(resumeSql(w.serverVersion));
      promotedAt = Date.now();
      continue;
    }
    if (pm.exited() !== undefined) {
      throw new BlocksnapError('E_PG', `PostgreSQL on ${o.dataDir} exited (${pm.exited()}) before answering:\n${await logTail(o.logFile)}`);
    }
    if (Date.now() > end) throw new BlocksnapError('E_TIMEOUT', `PostgreSQL on ${o.dataDir} did not ${w.standby ? 'answer' : 'end recovery'} within ${w.timeoutMs} ms:\n${await logTail(o.logFile)}`);
    await sleep(w.promoteWhenPaused && !promotedAt ? 2 : 10);
  }
}

/** True if the server log says the port was taken (the start is retried on another free port). */
export async function portWasTaken(logFile: string): Promise<boolean> {
  return /could not bind|address already in use|could not create any TCP\/IP sockets|could not create lock file .*\.s\.PGSQL/i.test(await logTail(logFile));
}
