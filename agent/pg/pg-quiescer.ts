/**
 * Quiescing PostgreSQL around a volume snapshot, 9.0 through 18.
 *
 * Primary: one session, held open from connect to unquiesce, starts a backup
 * before the snapshot and stops it after; the stop call's label file (and
 * tablespace map) must travel with the image — without it a restore may start
 * from the wrong checkpoint. ≤ 9.5 backups are exclusive: the server writes
 * backup_label into the data directory, so it is inside the snapshot.
 * Standby: replay is paused and we wait until it really is paused, two
 * CHECKPOINTs pin the restartpoint (pinMinRecoveryPoint), then a non-exclusive
 * backup starts where the version allows it (9.6+); unquiesce stops the
 * backup *before* resuming replay, so the stop point (the standby's
 * minRecoveryPoint) is not past the WAL the snapshot holds.
 *
 * What must never outlive a job, and what releases it:
 *   - a session (non-exclusive) backup ends with its session: the server
 *     aborts it when the backend exits, also when the agent dies (the kernel
 *     closes the socket; TCP keepalive covers a vanished host). Nothing to
 *     remember across agent restarts, so it is not recorded.
 *   - an exclusive backup (≤ 9.5) and a replay pause are server-wide and
 *     survive the session (a leftover backup_label even makes a crashed ≤ 9.5
 *     primary recover from the wrong checkpoint). They are recorded before
 *     they are requested, released by unquiesce/abort, by a watchdog if
 *     unquiesce never comes (the timer keeps the process alive on purpose),
 *     and by `PgQuiescer.releaseStale` at the next agent start.
 *
 * The record, STATE/pg-quiesce/<key>.json (key: `stateKey`, default
 * "<host>-<port>" with anything outside [A-Za-z0-9._-] as "_"), UTF-8 JSON
 * exactly as `encodeQuiesceState` writes it (2-space indent, this key order,
 * trailing newline), temp + fsync + rename + directory fsync:
 *   { "format": "blocksnap-pg-quiesce", "version": 1,
 *     "label": "…", "createdAt": "ISO-8601",
 *     "agentPid": 123, "agentStartTime": "4567" | null,   (clock ticks since boot)
 *     "server": { "host": "…", "port": 5432, "database": "…", "user": "…",
 *                 "systemIdentifier": "…" | null, "version": 150010,
 *                 "role": "primary" | "standby" },
 *     "exclusiveBackup": false, "replayPaused": true }
 * Written only when a server-wide hold is about to be taken; removed once
 * everything is released. A record present at quiesce time means E_BUSY.
 */
import { readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import pg from 'pg';
import { fsyncDir, writeFileDurably } from '../../proto/shared/durable-file.js';
import { isAlive, processStartTime } from '../../proto/shared/proc.js';
import { BlocksnapError, isBlocksnapError, type ErrorCode } from '../../proto/errors.js';
import type { Logger } from '../../proto/shared/log.js';
import type { PgRole, PgServerInfo, Quiescer, QuiesceInfo, QuiesceOptions, ReleaseReport, UnquiesceResult } from './quiescer.js';
import { DETECT_SQL, majorOf, pgSqlFor, timelineOfWalFile, WAL_SEGMENT_SIZE_SQL, type PgSqlRow } from './sql-table.js';
import { missingStandbyWal } from './standby-wal-check.js';

export type PgRoleExpectation = PgRole | 'auto';

export interface PgQuiescerOptions {
  connection: pg.ClientConfig;
  role: PgRoleExpectation;
  /** Where the durable quiesce record goes (for releaseStale); none if omitted. */
  stateDir?: string;
  /** Name of the record; default derived from host and port. */
  stateKey?: string;
  /** How long to wait for replay to be really paused. Default 10 s. */
  pauseTimeoutMs?: number;
  pollIntervalMs?: number;
  /** Limit for the backup start (a spread checkpoint can take minutes). Default 10 min. */
  startTimeoutMs?: number;
  /** Limit for the backup stop (it may wait for the archiver). Default 10 min. */
  stopTimeoutMs?: number;
  /** Release everything if unquiesce has not come this long after quiesce. Default 600 s. */
  watchdogSeconds?: number;
  /** Stop waits until the WAL it needs is archived. Default false (the WAL is in the snapshot or fetched). */
  waitForArchive?: boolean;
  /** Also run a non-exclusive backup on a standby where the version allows it. Default true. */
  backupOnStandby?: boolean;
  logger?: Logger;
}

const LABEL_RE = /^[\x20-\x7e]{1,200}$/;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * A BlocksnapError with `what` in front; a server error keeps its SQLSTATE in
 * the message, a statement timeout becomes E_TIMEOUT.
 */
function pgError(what: string, e: unknown, code: ErrorCode = 'E_PG'): BlocksnapError {
  if (isBlocksnapError(e)) return new BlocksnapError(e.code, `${what}: ${e.message}`, { cause: e });
  const err = e as { message?: string; code?: string };
  if (err?.code === '57014' && /statement timeout/.test(err.message ?? '')) code = 'E_TIMEOUT';
  const state = typeof err?.code === 'string' && /^[0-9A-Z]{5}$/.test(err.code) ? ` [${err.code}]` : '';
  const auth = err?.code === '28P01' || err?.code === '28000' ? ' (authentication failed: check user and password)' : '';
  return new BlocksnapError(code, `${what}: ${err?.message ?? String(e)}${state}${auth}`, { cause: e });
}

async function openSession(config: pg.ClientConfig, onError: (e: Error) => void): Promise<pg.Client> {
  const t = targetOf(config);
  const client = new pg.Client({ application_name: 'blocksnap-quiesce', connectionTimeoutMillis: 10_000, keepAlive: true, ...config });
  client.on('error', onError);
  try {
    await client.connect();
  } catch (e) {
    await client.end().catch(() => undefined);
    throw pgError(`cannot connect to PostgreSQL at ${t.host}:${t.port} as ${t.user}`, e);
  }
  return client;
}

type Held = { backup: 'exclusive' | 'session' | null; paused: boolean; walSlot: string | null };

export class PgQuiescer implements Quiescer {
  private client: pg.Client | null = null;
  private broken: Error | null = null;
  private info: PgServerInfo | null = null;
  private sql: PgSqlRow | null = null;
  private state: 'new' | 'connected' | 'quiescing' | 'quiesced' | 'expired' | 'closed' = 'new';
  private held: Held = { backup: null, paused: false, walSlot: null };
  private chain: Promise<unknown> = Promise.resolve();
  private watchdog: NodeJS.Timeout | null = null;
  private aborting = false;
  private inflight = false;
  private timeoutMs = 0;
  private recorded = false;
  private run = { label: '', startLsn: null as string | null, labelFile: null as string | null, spcmapFile: null as string | null, replayLsn: null as string | null, backupT0: 0, pauseT0: 0 };

  constructor(private readonly opts: PgQuiescerOptions) {}

  get server(): PgServerInfo | null {
    return this.info;
  }

  private get where(): string {
    const t = targetOf(this.opts.connection);
    return `PostgreSQL at ${t.host}:${t.port}`;
  }

  connect(): Promise<PgServerInfo> {
    return this.serial(async () => {
      if (this.client && !this.broken) return this.info!;
      this.broken = null;
      const client = await openSession(this.opts.connection, (e) => (this.broken = e));
      try {
        const row = (await client.query(DETECT_SQL)).rows[0] as { version: number; in_recovery: boolean; pid: number };
        const sql = pgSqlFor(Number(row.version));
        const role: PgRole = row.in_recovery ? 'standby' : 'primary';
        if (this.opts.role !== 'auto' && this.opts.role !== role) {
          throw new BlocksnapError('E_PG', `${this.where} is a ${role}${role === 'standby' ? ' (in recovery)' : ' (not in recovery)'}, but it is configured as a ${this.opts.role}`);
        }
        if (role === 'standby' && !sql.replayPause) {
          throw new BlocksnapError('E_PG', `${this.where} is a PostgreSQL ${majorOf(row.version)} standby: replay cannot be paused before 9.1`);
        }
        for (const s of sql.sessionSetup) await client.query(s);
        const sysid = sql.systemIdentifier ? String((await client.query(sql.systemIdentifier)).rows[0].sysid) : null;
        this.client = client;
        this.sql = sql;
        this.timeoutMs = 0;
        this.info = { version: Number(row.version), major: majorOf(row.version), role, backendPid: Number(row.pid), systemIdentifier: sysid };
        this.state = 'connected';
        return this.info;
      } catch (e) {
        await client.end().catch(() => undefined);
        throw isBlocksnapError(e) ? e : pgError(`${this.where}: cannot check version and role`, e);
      }
    });
  }

  quiesce(opts: QuiesceOptions): Promise<QuiesceInfo> {
    return this.serial(async () => {
      if (this.state !== 'connected' || !this.info || !this.sql) throw new BlocksnapError('E_USAGE', `quiesce: the quiescer is ${this.state}, not connected`);
      if (!LABEL_RE.test(opts.label)) throw new BlocksnapError('E_USAGE', `backup label must be 1–200 printable ASCII characters: ${JSON.stringify(opts.label)}`);
      const { role } = this.info;
      const sql = this.sql;
      const backup = role === 'primary' || (sql.backupOnStandby && this.opts.backupOnStandby !== false);
      const t0 = performance.now();
      this.aborting = false;
      this.state = 'quiescing';
      this.run = { label: opts.label, startLsn: null, labelFile: null, spcmapFile: null, replayLsn: null, backupT0: 0, pauseT0: 0 };
      try {
        if (role === 'standby') await this.refuseForeignPause();
        await this.record({ exclusiveBackup: backup && sql.exclusive, replayPaused: role === 'standby' });
        // A standby pauses replay and pins its restartpoint BEFORE the backup
        // starts: the label names the newest restartpoint, and with replay
        // paused no later restartpoint can remove its segments before the
        // snapshot (see pinMinRecoveryPoint).
        if (role === 'standby') {
          await this.pauseReplay();
          await this.pinMinRecoveryPoint();
        }
        if (role === 'primary') await this.holdWal();
        if (backup) await this.startBackup(opts.fast ?? true);
        this.state = 'quiesced';
        this.armWatchdog();
        return { role, version: this.info.version, exclusive: backup && sql.exclusive, backup, startLsn: this.run.startLsn, replayLsn: this.run.replayLsn, seconds: (performance.now() - t0) / 1000 };
      } catch (e) {
        const report = await this.release('quiesce failed');
        const err = this.aborting ? new BlocksnapError('E_CANCELLED', `${this.where}: quiesce aborted`, { cause: e }) : pgError(`${this.where}: quiesce failed`, e);
        if (report.failed.length) err.message += `; and could not release: ${report.failed.join('; ')}`;
        throw err;
      }
    });
  }

  unquiesce(): Promise<UnquiesceResult> {
    return this.serial(async () => {
      if (this.state === 'expired') {
        this.state = this.client && !this.broken ? 'connected' : 'closed';
        throw new BlocksnapError('E_TIMEOUT', `${this.where}: the watchdog released the quiesce after ${this.watchdogSeconds} s; this image has no valid backup label`);
      }
      if (this.state !== 'quiesced' || !this.info || !this.sql) throw new BlocksnapError('E_USAGE', `unquiesce: the quiescer is ${this.state}, not quiesced`);
      this.disarmWatchdog();
      const { role, version } = this.info;
      const sql = this.sql;
      const exclusive = this.held.backup === 'exclusive';
      let stop: { lsn: string; labelfile: string | null; spcmapfile: string | null } | null = null;
      let timeline: number | null = null;
      let backupSeconds = 0;
      let pausedSeconds = 0;
      try {
        if (this.held.backup) {
          const params = sql.stopTakesWaitForArchive ? [this.opts.waitForArchive ?? false] : [];
          stop = (await this.query(sql.stopBackup, params, this.opts.stopTimeoutMs ?? 600_000)).rows[0];
          this.held.backup = null;
          backupSeconds = (performance.now() - this.run.backupT0) / 1000;
        }
        // Still paused: what the WAL directory holds now, the snapshot held (standby-wal-check.ts).
        if (role === 'standby' && this.held.paused && stop?.labelfile) await this.proveStandbyWal(stop.labelfile, stop.lsn);
        if (this.held.paused) {
          await this.query(sql.replayResume!);
          this.held.paused = false;
          pausedSeconds = (performance.now() - this.run.pauseT0) / 1000;
        }
        timeline = await this.timelineAt(stop?.lsn ?? null);
      } catch (e) {
        const report = await this.release('unquiesce failed');
        const err = pgError(`${this.where}: unquiesce failed`, e);
        if (report.failed.length) err.message += `; and could not release: ${report.failed.join('; ')}`;
        throw err;
      }
      await this.forget();
      this.state = 'connected';
      return {
        labelFile: exclusive ? this.run.labelFile : (stop?.labelfile ?? null),
        spcmapFile: exclusive ? this.run.spcmapFile : (stop?.spcmapfile ?? null),
        startLsn: this.run.startLsn,
        stopLsn: stop?.lsn ?? null,
        timeline,
        ...(this.run.replayLsn ? { replayLsn: this.run.replayLsn } : {}),
        exclusive, version, role, pausedSeconds, backupSeconds,
      };
    });
  }

  /** Releases whatever is held (errors ignored, reported), cancelling a statement in flight; idempotent; the session stays if healthy. */
  async abort(reason = 'aborted'): Promise<ReleaseReport> {
    this.aborting = true;
    if (this.inflight) await this.cancelInflight();
    return this.serial(() => this.release(reason));
  }

  /** abort() and end the session. */
  async close(): Promise<ReleaseReport> {
    const report = await this.abort('closed');
    await this.serial(async () => {
      await this.client?.end().catch(() => undefined);
      this.client = null;
      this.state = 'closed';
    });
    return report;
  }

  // ---- steps -------------------------------------------------------------

  private async startBackup(fast: boolean): Promise<void> {
    const sql = this.sql!;
    this.run.backupT0 = performance.now();
    let lsn: string;
    try {
      lsn = (await this.query(sql.startBackup, [this.run.label, fast], this.opts.startTimeoutMs ?? 600_000)).rows[0].lsn;
    } catch (e) {
      // A start cut short may have got through on the server: for a session
      // backup ending the session undoes it; an exclusive one is checked by label.
      if (!sql.exclusive) await this.dropSession();
      else if (await this.exclusiveLabelIsOurs(this.client).catch(() => false)) this.held.backup = 'exclusive';
      throw pgError('backup start did not complete', e);
    }
    this.held.backup = sql.exclusive ? 'exclusive' : 'session';
    this.run.startLsn = lsn;
    if (sql.exclusive) {
      this.run.labelFile = (await this.query(sql.readLabelFile!)).rows[0].labelfile;
      this.run.spcmapFile = sql.readSpcmapFile ? ((await this.query(sql.readSpcmapFile)).rows[0].spcmapfile ?? null) : null;
    }
  }

  /**
   * A primary's WAL from the backup start is read after the stop, from the
   * live WAL directory (captureWal): a temporary replication slot of this
   * session, taken before the backup starts, keeps a checkpoint in between
   * from removing or recycling it, until the session ends (close) or the next
   * window replaces it. Without one (9.6 and older, no REPLICATION privilege,
   * no free slot) the job goes on as before: the capture then fails, loudly,
   * only if such a checkpoint came. Temporary slots never outlive the
   * session, so a killed agent leaves none.
   */
  private async holdWal(): Promise<void> {
    const sql = this.sql!;
    if (!sql.walHoldSlot) return;
    await this.dropWalSlot();
    const name = `blocksnap_wal_${this.info!.backendPid}`;
    try {
      await this.query(sql.walHoldSlot, [name]);
      this.held.walSlot = name;
    } catch (e) {
      this.opts.logger?.warn({ err: (e as Error).message }, 'no temporary replication slot holds the WAL during the backup: a checkpoint before the capture may recycle it');
    }
  }

  private async dropWalSlot(): Promise<void> {
    const name = this.held.walSlot;
    if (!name) return;
    this.held.walSlot = null;
    // Dropped by the server with the session anyway: a failure here only means it goes later.
    await this.query('SELECT pg_drop_replication_slot($1)', [name]).catch(() => undefined);
  }

  /**
   * A standby's image recovers from the pg_wal inside its snapshot: every
   * segment from the label's start to the stop point must be there. Without
   * the right to list the WAL directory (superuser or pg_monitor; 10+) it is
   * not checked, and a warning says so.
   */
  private async proveStandbyWal(label: string, stopLsn: string): Promise<void> {
    const sql = this.sql!;
    if (!sql.listWalDir) return;
    let names: string[];
    let segmentSize: number;
    try {
      names = (await this.query(sql.listWalDir)).rows.map((r) => String(r.name));
      segmentSize = Number((await this.query(WAL_SEGMENT_SIZE_SQL)).rows[0].seg);
    } catch (e) {
      this.opts.logger?.warn({ err: (e as Error).message }, "cannot list the standby's WAL directory (needs superuser or pg_monitor): the image's WAL is not checked");
      return;
    }
    const missing = missingStandbyWal(label, stopLsn, segmentSize, names);
    if (missing.length) {
      throw new BlocksnapError('E_PG', `the standby's WAL directory lacks ${missing.join(', ')} of this backup (from the label's start to the stop point ${stopLsn}): ` +
        'the image would not start; removed before the snapshot, by something other than PostgreSQL while replay was paused');
    }
  }

  private async refuseForeignPause(): Promise<void> {
    const state = (await this.query(this.sql!.replayPauseState!)).rows[0].state as string;
    if (state !== 'not paused') {
      throw new BlocksnapError('E_BUSY', `replay is already paused (${state}) by someone else; blocksnap would resume it afterwards, so it refuses`);
    }
  }

  private async pauseReplay(): Promise<void> {
    const sql = this.sql!;
    const timeoutMs = this.opts.pauseTimeoutMs ?? 10_000;
    const poll = this.opts.pollIntervalMs ?? 25;
    this.run.pauseT0 = performance.now();
    this.held.paused = true;
    await this.query(sql.replayPause!);
    const deadline = performance.now() + timeoutMs;
    let last: { state: string; lsn: string | null } | null = null;
    for (;;) {
      if (this.aborting) throw new BlocksnapError('E_CANCELLED', 'aborted while waiting for replay to pause');
      const state = (await this.query(sql.replayPauseState!)).rows[0].state as string;
      const lsn = (await this.query(sql.replayLsn)).rows[0].lsn as string | null;
      const prev = last;
      last = { state, lsn };
      if (state === 'not paused') throw new BlocksnapError('E_PG', 'replay was resumed (or the server promoted) while waiting for the pause');
      // ≤ 13 only shows the request: paused once the replay position holds still
      // across a poll (at most the record being applied still completes).
      if (sql.pauseConfirmation === 'state' ? state === 'paused' : prev?.state === 'pause requested' && prev.lsn === lsn) break;
      if (performance.now() > deadline) {
        throw new BlocksnapError('E_TIMEOUT', `replay did not pause within ${timeoutMs} ms (state ${state}, replay at ${lsn ?? 'none'})`);
      }
      await sleep(poll);
    }
    this.run.replayLsn = last.lsn;
  }

  /**
   * A restored standby image stops at the minRecoveryPoint in its
   * pg_control, which may lag the paused replay position: commits replayed
   * in between would be missing. A CHECKPOINT on a standby is a restartpoint;
   * one that finds nothing new to do is skipped, and a skipped restartpoint
   * moves minRecoveryPoint to the replay position and writes pg_control. The
   * first CHECKPOINT may do real work (a checkpoint record was replayed since
   * the last restartpoint), the second is then always skipped. Without the
   * privilege (superuser or pg_checkpoint) the image is still consistent,
   * only possibly older than `replayLsn`: that is logged, not fatal.
   * Runs before the backup starts, replay already paused: a restartpoint
   * removes (or recycles) the segments before its redo point, and one made
   * after the backup start — at a checkpoint the standby replayed in
   * between, e.g. the primary's own backup start during concurrent jobs —
   * removed the segment holding the checkpoint the label names; the image
   * then failed with "could not locate required checkpoint record" (the
   * LVM e2e, stop 18). Paused, no later restartpoint finds anything new.
   */
  private async pinMinRecoveryPoint(): Promise<void> {
    try {
      await this.query('CHECKPOINT');
      await this.query('CHECKPOINT');
    } catch (e) {
      this.opts.logger?.warn({ err: (e as Error).message }, 'CHECKPOINT on the standby failed: the image may stop before the paused replay position');
    }
  }

  private async timelineAt(lsn: string | null): Promise<number | null> {
    const sql = this.sql!;
    if (this.info!.role === 'primary' && lsn) return timelineOfWalFile((await this.query(sql.walFileName, [lsn])).rows[0].walfile);
    return sql.standbyTimeline ? Number((await this.query(sql.standbyTimeline)).rows[0].timeline) : null;
  }

  /**
   * Releases what is held, each step on its own: a failed backup stop must not
   * keep replay paused. The session is used while healthy; a session backup
   * ends with the session, and the server-wide holds go through a fresh one.
   */
  private async release(reason: string): Promise<ReleaseReport> {
    this.disarmWatchdog();
    const report: ReleaseReport = { released: [], failed: [] };
    const sql = this.sql;
    if (sql && this.held.backup === 'session') {
      try {
        await this.query(sql.stopBackup, sql.stopTakesWaitForArchive ? [false] : [], 60_000);
        report.released.push('stopped backup');
      } catch {
        await this.dropSession();
        report.released.push('ended session (backup aborted by the server)');
      }
      this.held.backup = null;
    }
    if (sql && this.held.backup === 'exclusive') {
      await this.onAnySession(sql.stopBackup, 'stop exclusive backup', report);
      if (!report.failed.length) this.held.backup = null;
    }
    if (sql && this.held.paused) {
      const before = report.failed.length;
      await this.onAnySession(sql.replayResume!, 'resume replay', report);
      if (report.failed.length === before) this.held.paused = false;
    }
    // Not reported: after a good window it is the normal end of the WAL hold, not a rescue.
    await this.dropWalSlot();
    if (!this.held.backup && !this.held.paused) await this.forget().catch((e) => report.failed.push(`remove state record: ${(e as Error).message}`));
    if (this.state === 'quiescing' || this.state === 'quiesced' || this.state === 'expired') this.state = this.client && !this.broken ? 'connected' : 'closed';
    if (report.released.length || report.failed.length) this.opts.logger?.warn({ reason, ...report }, 'released PostgreSQL quiesce');
    return report;
  }

  private async onAnySession(text: string, what: string, report: ReleaseReport): Promise<void> {
    try {
      await this.query(text, [], 30_000);
      report.released.push(what);
      return;
    } catch {
      // fall through to a fresh session
    }
    let side: pg.Client | null = null;
    try {
      side = await openSession({ ...this.opts.connection, application_name: 'blocksnap-release' }, () => undefined);
      await side.query(text);
      report.released.push(`${what} (fresh session)`);
    } catch (e) {
      report.failed.push(`${what}: ${(e as Error).message}`);
    } finally {
      await side?.end().catch(() => undefined);
    }
  }

  private async exclusiveLabelIsOurs(client: pg.Client | null): Promise<boolean> {
    if (!client || !this.sql?.readLabelFile) return false;
    const label = (await client.query(this.sql.readLabelFile)).rows[0]?.labelfile as string | undefined;
    return !!label && label.includes(`\nLABEL: ${this.run.label}\n`);
  }

  // ---- session plumbing --------------------------------------------------

  private async query(text: string, params: unknown[] = [], timeoutMs = 30_000): Promise<pg.QueryResult> {
    if (!this.client || this.broken) throw new BlocksnapError('E_PG', `the session is gone${this.broken ? `: ${this.broken.message}` : ''}`);
    this.inflight = true;
    try {
      if (this.timeoutMs !== timeoutMs) {
        await this.client.query(`SET statement_timeout = ${Math.floor(timeoutMs)}`);
        this.timeoutMs = timeoutMs;
      }
      // The server enforces the limit; the client-side one only covers a dead connection.
      return await this.client.query({ text, values: params, query_timeout: timeoutMs + 10_000 } as pg.QueryConfig);
    } catch (e) {
      if ((e as Error).message?.includes('Query read timeout')) await this.dropSession();
      throw pgError(text, e);
    } finally {
      this.inflight = false;
    }
  }

  /** Cancels the running statement from a side session (abort during a long start or pause wait). */
  private async cancelInflight(): Promise<void> {
    const pid = this.info?.backendPid;
    if (!pid) return;
    let side: pg.Client | null = null;
    try {
      side = await openSession({ ...this.opts.connection, application_name: 'blocksnap-cancel' }, () => undefined);
      await side.query('SELECT pg_cancel_backend($1)', [pid]);
    } catch {
      // The statement ends by its own timeout anyway.
    } finally {
      await side?.end().catch(() => undefined);
    }
  }

  private async dropSession(): Promise<void> {
    const c = this.client;
    this.client = null;
    this.broken ??= new Error('session ended');
    await c?.end().catch(() => undefined);
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.chain.then(fn, fn);
    this.chain = next.catch(() => undefined);
    return next;
  }

  private get watchdogSeconds(): number {
    return this.opts.watchdogSeconds ?? 600;
  }

  private armWatchdog(): void {
    this.disarmWatchdog();
    this.watchdog = setTimeout(() => {
      this.watchdog = null;
      void this.serial(async () => {
        if (this.state !== 'quiesced') return;
        this.opts.logger?.error({ seconds: this.watchdogSeconds }, 'quiesce watchdog fired: unquiesce did not come');
        await this.release('watchdog');
        this.state = 'expired';
      });
    }, this.watchdogSeconds * 1000);
  }

  private disarmWatchdog(): void {
    if (this.watchdog) clearTimeout(this.watchdog);
    this.watchdog = null;
  }

  // ---- durable record ----------------------------------------------------

  private async record(flags: Pick<QuiesceState, 'exclusiveBackup' | 'replayPaused'>): Promise<void> {
    if (!this.opts.stateDir || (!flags.exclusiveBackup && !flags.replayPaused)) return;
    const file = quiesceStatePath(this.opts.stateDir, this.opts.connection, this.opts.stateKey);
    const existing = await readQuiesceState(file);
    if (existing) {
      throw new BlocksnapError('E_BUSY', `a quiesce from ${existing.createdAt} (agent pid ${existing.agentPid}) is still recorded in ${file}; PgQuiescer.releaseStale() clears it`);
    }
    const t = targetOf(this.opts.connection);
    await writeQuiesceState(file, {
      format: 'blocksnap-pg-quiesce', version: 1, label: this.run.label, createdAt: new Date().toISOString(),
      agentPid: process.pid, agentStartTime: await processStartTime(process.pid),
      server: { host: t.host, port: t.port, database: t.database, user: t.user, systemIdentifier: this.info!.systemIdentifier, version: this.info!.version, role: this.info!.role },
      ...flags,
    });
    this.recorded = true;
  }

  private async forget(): Promise<void> {
    if (!this.recorded || !this.opts.stateDir) return;
    await deleteQuiesceState(quiesceStatePath(this.opts.stateDir, this.opts.connection, this.opts.stateKey));
    this.recorded = false;
  }

  /**
   * At agent start: releases what the record of a dead agent's quiesce says it
   * held — resumes replay if it is still paused (someone who paused it since
   * is overruled: the record cannot tell), stops an exclusive backup only if
   * the backup_label on the server carries our label — then removes the record.
   */
  static async releaseStale(opts: { stateDir: string; connection: pg.ClientConfig; stateKey?: string; logger?: Logger }): Promise<{ file: string; found: boolean; actions: string[] }> {
    const file = quiesceStatePath(opts.stateDir, opts.connection, opts.stateKey);
    const rec = await readQuiesceState(file);
    if (!rec) return { file, found: false, actions: [] };
    if (rec.agentStartTime !== null && (await isAlive(rec.agentPid, rec.agentStartTime))) {
      throw new BlocksnapError('E_BUSY', `${file} belongs to agent pid ${rec.agentPid}, which is still running`);
    }
    const t = targetOf(opts.connection);
    const client = await openSession({ ...opts.connection, application_name: 'blocksnap-release' }, () => undefined);
    const actions: string[] = [];
    try {
      const row = (await client.query(DETECT_SQL)).rows[0] as { version: number; in_recovery: boolean };
      const sql = pgSqlFor(Number(row.version));
      const sysid = sql.systemIdentifier ? String((await client.query(sql.systemIdentifier)).rows[0].sysid) : null;
      if (rec.server.systemIdentifier && sysid && rec.server.systemIdentifier !== sysid) {
        throw new BlocksnapError('E_PG', `${file} was written for system ${rec.server.systemIdentifier}, but ${t.host}:${t.port} is system ${sysid}: not touching it`);
      }
      if (rec.replayPaused && row.in_recovery && sql.replayPauseState) {
        const state = (await client.query(sql.replayPauseState)).rows[0].state as string;
        if (state !== 'not paused') {
          await client.query(sql.replayResume!);
          actions.push(`resumed replay (was ${state})`);
        }
      }
      if (rec.exclusiveBackup && !row.in_recovery && sql.readLabelFile) {
        const label = await client.query(sql.readLabelFile).then((r) => r.rows[0]?.labelfile as string | null, () => null);
        if (label?.includes(`\nLABEL: ${rec.label}\n`)) {
          await client.query(sql.stopBackup);
          actions.push('stopped exclusive backup');
        }
      }
    } catch (e) {
      throw pgError(`releasing the stale quiesce recorded in ${file}`, e);
    } finally {
      await client.end().catch(() => undefined);
    }
    await deleteQuiesceState(file);
    opts.logger?.warn({ file, actions, label: rec.label, createdAt: rec.createdAt }, 'released a stale PostgreSQL quiesce');
    return { file, found: true, actions };
  }
}

// ---- the record's format ---------------------------------------------------

export interface QuiesceState {
  format: 'blocksnap-pg-quiesce';
  version: 1;
  label: string;
  createdAt: string;
  agentPid: number;
  agentStartTime: string | null;
  server: { host: string; port: number; database: string; user: string; systemIdentifier: string | null; version: number; role: PgRole };
  exclusiveBackup: boolean;
  replayPaused: boolean;
}

/** Where a connection's settings (or libpq's defaults) point. */
export function targetOf(c: pg.ClientConfig): { host: string; port: number; database: string; user: string } {
  const user = c.user ?? process.env.PGUSER ?? 'postgres';
  return {
    host: c.host ?? process.env.PGHOST ?? 'localhost',
    port: Number(c.port ?? process.env.PGPORT ?? 5432),
    database: c.database ?? process.env.PGDATABASE ?? user,
    user,
  };
}

export function quiesceStatePath(stateDir: string, connection: pg.ClientConfig, key?: string): string {
  const t = targetOf(connection);
  return path.join(stateDir, 'pg-quiesce', `${(key ?? `${t.host}-${t.port}`).replace(/[^A-Za-z0-9._-]/g, '_')}.json`);
}

/** Field order is the format: built explicitly, not from the caller's object. */
export function encodeQuiesceState(r: QuiesceState): string {
  const s = r.server;
  const ordered = {
    format: r.format, version: r.version, label: r.label, createdAt: r.createdAt, agentPid: r.agentPid, agentStartTime: r.agentStartTime,
    server: { host: s.host, port: s.port, database: s.database, user: s.user, systemIdentifier: s.systemIdentifier, version: s.version, role: s.role },
    exclusiveBackup: r.exclusiveBackup, replayPaused: r.replayPaused,
  };
  return `${JSON.stringify(ordered, null, 2)}\n`;
}

export async function readQuiesceState(file: string): Promise<QuiesceState | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new BlocksnapError('E_STORE_IO', `cannot read ${file}`, { cause: e });
  }
  let r: Partial<QuiesceState>;
  try {
    r = JSON.parse(text) as Partial<QuiesceState>;
  } catch (e) {
    throw new BlocksnapError('E_FORMAT', `${file} is not JSON`, { cause: e });
  }
  if (r.format !== 'blocksnap-pg-quiesce' || r.version !== 1 || typeof r.label !== 'string' || !r.server || typeof r.agentPid !== 'number') {
    throw new BlocksnapError('E_FORMAT', `${file} is not a blocksnap quiesce record (version 1)`);
  }
  return r as QuiesceState;
}

export async function writeQuiesceState(file: string, r: QuiesceState): Promise<void> {
  await writeFileDurably(file, Buffer.from(encodeQuiesceState(r)));
}

export async function deleteQuiesceState(file: string): Promise<void> {
  await rm(file, { force: true });
  await fsyncDir(path.dirname(file)).catch(() => undefined);
}

