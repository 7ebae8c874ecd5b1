import type { Logger } from '../../proto/shared/log.js';

/**
 * The Quiescer port: what a capture window (agent/capture.ts, DESIGN.md §8)
 * needs from the database whose data lives on the volumes. PgQuiescer
 * (pg-quiescer.ts) is the PostgreSQL implementation; tests use a fake
 * (pg/testing/fake-quiescer.ts). Every implementation passes
 * test/agent/quiescer.contract.ts.
 *
 * Contract, in the order capture calls it:
 * - `connect()` opens the session and says what the server is. Called again
 *   while the session is healthy it returns the same answer. A server that is
 *   not what it was configured to be (a standby where a primary is expected,
 *   or the reverse) is refused with E_PG, and nothing is held.
 * - `quiesce(opts)` only after connect (else E_USAGE), with a label of 1–200
 *   printable ASCII characters (else E_USAGE, nothing held). When it resolves
 *   the database is held: what is on disk from then on is consistent for a
 *   restore with the label file unquiesce returns (a backup in progress on a
 *   primary; replay paused on a standby). When it rejects, everything it took
 *   is released and the quiescer is connected again. quiesce while already
 *   quiesced is E_USAGE.
 * - `unquiesce()` only while quiesced (else E_USAGE): releases the hold and
 *   returns what the image needs (label file, LSNs, timeline). Held past its
 *   watchdog, the hold was released already: E_TIMEOUT, and the image has no
 *   valid label. Afterwards the quiescer is connected, and a next
 *   quiesce/unquiesce window may follow on the same session. A primary's WAL
 *   from the backup start may still be held on the server (PgQuiescer: a
 *   temporary replication slot) until close or the next window, so the
 *   image's WAL can be read after unquiesce; holding it is best effort.
 * - `close()` releases whatever is still held and ends the session, in any
 *   state. It does not reject: what it could not release is listed in
 *   `failed` (each holder also has its own last resort, e.g. a watchdog).
 *   A second close releases nothing and reports nothing.
 */
export interface Quiescer {
  connect(): Promise<PgServerInfo>;
  quiesce(opts: QuiesceOptions): Promise<QuiesceInfo>;
  unquiesce(): Promise<UnquiesceResult>;
  close(): Promise<ReleaseReport>;
}

/**
 * Builds the quiescer of one capture window (a fresh session per job), with
 * the job's logger. The agent composes it from its configuration; nothing
 * below the composition constructs a concrete quiescer.
 */
export type QuiescerFactory = (log: Logger) => Quiescer;

export type PgRole = 'primary' | 'standby';

export interface PgServerInfo {
  version: number;
  major: string;
  role: PgRole;
  backendPid: number;
  systemIdentifier: string | null;
}

export interface QuiesceOptions {
  /** Backup label: printable ASCII, ≤ 200 bytes (it ends up in backup_label). */
  label: string;
  /** Immediate checkpoint at backup start. Default true: a spread one can hold the job for minutes. */
  fast?: boolean;
}

export interface QuiesceInfo {
  role: PgRole;
  version: number;
  exclusive: boolean;
  /** A backup is running (always on a primary; on a standby where allowed). */
  backup: boolean;
  startLsn: string | null;
  /** Standby: replay position while paused. */
  replayLsn: string | null;
  seconds: number;
}

export interface UnquiesceResult {
  /** Contents for backup_label; for exclusive backups a copy of the file inside the snapshot. */
  labelFile: string | null;
  spcmapFile: string | null;
  startLsn: string | null;
  stopLsn: string | null;
  timeline: number | null;
  replayLsn?: string;
  /** True: the label is inside the snapshot already (≤ 9.5). */
  exclusive: boolean;
  version: number;
  role: PgRole;
  /** From the pause request to the resume. */
  pausedSeconds: number;
  /** From the backup start call to the stop's return. */
  backupSeconds: number;
}

/** What a release did: each hold given back, and each one that could not be. */
export interface ReleaseReport {
  released: string[];
  failed: string[];
}
