/**
 * The one table of PostgreSQL SQL per server version, 9.0 through 18.
 *
 * Every statement blocksnap sends to a server to quiesce it, release it, read
 * LSNs and prepare a restored data directory whose spelling or existence
 * depends on the version is looked up here by `server_version_num` (the
 * same on every supported version, e.g. CHECKPOINT, pg_drop_replication_slot
 * of a slot made through this table, stays inline); nothing else in the
 * agent branches on the version.
 * Each row is complete (no inheritance between rows) so a reviewer can read
 * one row and know exactly what runs against that version.
 *
 * Result shapes are uniform across rows (columns are aliased):
 *   startBackup      params ($1 label, $2 fast)            → { lsn text }
 *   stopBackup       params ($1 wait_for_archive) or none  → { lsn, labelfile, spcmapfile }
 *                    (labelfile/spcmapfile NULL for exclusive backups: the
 *                    server wrote them into the data directory instead)
 *   readLabelFile / readSpcmapFile (exclusive only)        → { labelfile } / { spcmapfile }
 *   walFileName      params ($1 lsn), primary only          → { walfile } (timeline = first 8 hex digits)
 *   standbyTimeline                                        → { timeline }
 *   currentLsn / replayLsn / receiveLsn                    → { lsn text }
 *   replayPauseState                                       → { state: 'not paused' | 'pause requested' | 'paused' }
 *   systemIdentifier                                       → { sysid text }
 *   controlCheckpoint (pg_control as the server reads it)  → { lsn text }
 *   listWalDir                                             → { name } per file
 *
 * Before 14, the only observable is "a pause was requested" (the flag that
 * pg_is_*_replay_paused() returns): the startup process checks it before each
 * record, so the quiescer confirms a pause there by a flag plus a replay LSN
 * that stays put (`pauseConfirmation: 'stable-replay-lsn'`). 14 added
 * pg_get_wal_replay_pause_state(), which says 'paused' only once the startup
 * process has really stopped (`'state'`).
 *
 * Versions after 18 use the last row: the 15+ API has been stable since.
 */
import { BlocksnapError } from '../../proto/errors.js';

export type PauseConfirmation = 'state' | 'stable-replay-lsn';

export interface RecoveryStyle {
  /** Where recovery settings go: recovery.conf (≤ 11) or postgresql.auto.conf with signal files (12+). */
  configFile: 'recovery.conf' | 'postgresql.auto.conf';
  signalFiles: boolean;
  /** recovery_target = 'immediate' exists (9.4+): end recovery where the backup became consistent. */
  targetImmediate: boolean;
  /** The setting that promotes at the target instead of pausing there (both default to pausing). */
  promoteAtTarget: readonly [name: string, value: string] | null;
}

export interface PgSqlRow {
  /** First server_version_num this row applies to. */
  since: number;
  /** Human range, for messages and tests. */
  range: string;
  exclusive: boolean;
  startBackup: string;
  stopBackup: string;
  stopTakesWaitForArchive: boolean;
  /** Where the backup label comes from: the stop call's result or the data directory (exclusive). */
  labelFrom: 'stop-result' | 'data-directory';
  readLabelFile: string | null;
  readSpcmapFile: string | null;
  /** A (non-exclusive) backup may run on a standby. */
  backupOnStandby: boolean;
  walFileName: string;
  standbyTimeline: string | null;
  currentLsn: string;
  replayLsn: string;
  receiveLsn: string;
  replayPause: string | null;
  replayResume: string | null;
  replayPauseState: string | null;
  pauseConfirmation: PauseConfirmation | null;
  systemIdentifier: string | null;
  /**
   * The last checkpoint's LSN as the server reads it from its pg_control
   * (9.6+): with the system identifier, what proves that a directory the
   * agent sees is the server's data directory (data-dir-proof.ts).
   */
  controlCheckpoint: string | null;
  /** The WAL directory's file names (10+; superuser or pg_monitor): a standby's image WAL is checked before replay resumes. */
  listWalDir: string | null;
  walDir: 'pg_xlog' | 'pg_wal';
  recovery: RecoveryStyle;
  /**
   * Creates a temporary physical replication slot ($1 name) that reserves WAL
   * from the last checkpoint's redo point at once (10+; 9.6 has no temporary
   * slots, and a permanent one would outlive a killed agent). A primary's
   * quiescer takes one before its backup starts: the image's WAL from the
   * backup start is read from the live WAL directory after the stop, and a
   * checkpoint in between (another backup's start, a manual one, max_wal_size)
   * would otherwise remove or recycle those segments. Dropped with the session.
   */
  walHoldSlot: string | null;
  /**
   * Run once when the quiescer's session opens. The session is idle while the
   * volume is snapshotted: a server-wide idle_session_timeout (14+) would end
   * it and with it a non-exclusive backup.
   */
  sessionSetup: readonly string[];
}

/** Version and role, the same on every version ≥ 9.0. */
export const DETECT_SQL =
  "SELECT current_setting('server_version_num')::int AS version, pg_is_in_recovery() AS in_recovery, pg_backend_pid() AS pid";

/** The WAL segment size in bytes → { seg }, the same on every version ≥ 9.0 (≤ 10 report it in 8 kB units, 11+ in bytes). */
export const WAL_SEGMENT_SIZE_SQL = `SELECT setting::bigint * CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 WHEN '8kB' THEN 8192 WHEN 'MB' THEN 1048576 ELSE 1 END AS seg
  FROM pg_settings WHERE name = 'wal_segment_size'`;

const EXCLUSIVE_STOP = 'SELECT pg_stop_backup()::text AS lsn, NULL::text AS labelfile, NULL::text AS spcmapfile';
const XLOG_NAMES = {
  walFileName: 'SELECT pg_xlogfile_name($1) AS walfile',
  currentLsn: 'SELECT pg_current_xlog_location()::text AS lsn',
  replayLsn: 'SELECT pg_last_xlog_replay_location()::text AS lsn',
  receiveLsn: 'SELECT pg_last_xlog_receive_location()::text AS lsn',
} as const;
const WAL_NAMES = {
  walFileName: 'SELECT pg_walfile_name($1) AS walfile',
  currentLsn: 'SELECT pg_current_wal_lsn()::text AS lsn',
  replayLsn: 'SELECT pg_last_wal_replay_lsn()::text AS lsn',
  receiveLsn: 'SELECT pg_last_wal_receive_lsn()::text AS lsn',
} as const;
const XLOG_PAUSE = {
  replayPause: 'SELECT pg_xlog_replay_pause()',
  replayResume: 'SELECT pg_xlog_replay_resume()',
  replayPauseState: "SELECT CASE WHEN pg_is_xlog_replay_paused() THEN 'pause requested' ELSE 'not paused' END AS state",
  pauseConfirmation: 'stable-replay-lsn',
} as const;
const WAL_PAUSE_FLAG = {
  replayPause: 'SELECT pg_wal_replay_pause()',
  replayResume: 'SELECT pg_wal_replay_resume()',
  replayPauseState: "SELECT CASE WHEN pg_is_wal_replay_paused() THEN 'pause requested' ELSE 'not paused' END AS state",
  pauseConfirmation: 'stable-replay-lsn',
} as const;
const WAL_PAUSE_STATE = {
  replayPause: 'SELECT pg_wal_replay_pause()',
  replayResume: 'SELECT pg_wal_replay_resume()',
  replayPauseState: 'SELECT pg_get_wal_replay_pause_state() AS state',
  pauseConfirmation: 'state',
} as const;
const NON_EXCLUSIVE = {
  exclusive: false,
  labelFrom: 'stop-result',
  readLabelFile: null,
  readSpcmapFile: null,
  backupOnStandby: true,
  standbyTimeline: 'SELECT timeline_id AS timeline FROM pg_control_checkpoint()',
  systemIdentifier: 'SELECT system_identifier::text AS sysid FROM pg_control_system()',
  controlCheckpoint: 'SELECT checkpoint_lsn::text AS lsn FROM pg_control_checkpoint()',
} as const;
const SETUP = ['SET statement_timeout = 0'] as const;
const HOLD_SLOT = 'SELECT pg_create_physical_replication_slot($1, true, true)';
const LIST_WAL_DIR = 'SELECT name FROM pg_ls_waldir()';
const SETUP_14 = ['SET statement_timeout = 0', 'SET idle_session_timeout = 0'] as const;
const RECOVERY_CONF_NO_TARGET = { configFile: 'recovery.conf', signalFiles: false, targetImmediate: false, promoteAtTarget: null } as const;
const RECOVERY_CONF = { configFile: 'recovery.conf', signalFiles: false, targetImmediate: true, promoteAtTarget: ['recovery_target_action', 'promote'] } as const;
const RECOVERY_SIGNALS = { configFile: 'postgresql.auto.conf', signalFiles: true, targetImmediate: true, promoteAtTarget: ['recovery_target_action', 'promote'] } as const;

export const PG_SQL_TABLE: readonly PgSqlRow[] = [
  {
    since: 90000, range: '9.0', exclusive: true,
    startBackup: 'SELECT pg_start_backup($1, $2)::text AS lsn',
    stopBackup: EXCLUSIVE_STOP, stopTakesWaitForArchive: false,
    // 9.0 has only the (file, offset, length) form; 1 MiB is far above any label.
    labelFrom: 'data-directory', readLabelFile: "SELECT pg_read_file('backup_label', 0, 1048576) AS labelfile",
    readSpcmapFile: null, backupOnStandby: false, ...XLOG_NAMES, standbyTimeline: null,
    // Replay pause arrived in 9.1: a 9.0 standby cannot be quiesced.
    replayPause: null, replayResume: null, replayPauseState: null, pauseConfirmation: null,
    systemIdentifier: null, controlCheckpoint: null, walDir: 'pg_xlog', recovery: RECOVERY_CONF_NO_TARGET, listWalDir: null, walHoldSlot: null, sessionSetup: SETUP,
  },
  {
    since: 90100, range: '9.1–9.3', exclusive: true,
    startBackup: 'SELECT pg_start_backup($1, $2)::text AS lsn',
    stopBackup: EXCLUSIVE_STOP, stopTakesWaitForArchive: false,
    labelFrom: 'data-directory', readLabelFile: "SELECT pg_read_file('backup_label') AS labelfile",
    // No tablespace_map before 9.5: the pg_tblspc symlinks travel inside the snapshot.
    readSpcmapFile: null, backupOnStandby: false, ...XLOG_NAMES, standbyTimeline: null, ...XLOG_PAUSE,
    systemIdentifier: null, controlCheckpoint: null, walDir: 'pg_xlog', recovery: RECOVERY_CONF_NO_TARGET, listWalDir: null, walHoldSlot: null, sessionSetup: SETUP,
  },
  {
    since: 90400, range: '9.4', exclusive: true,
    startBackup: 'SELECT pg_start_backup($1, $2)::text AS lsn',
    stopBackup: EXCLUSIVE_STOP, stopTakesWaitForArchive: false,
    labelFrom: 'data-directory', readLabelFile: "SELECT pg_read_file('backup_label') AS labelfile",
    readSpcmapFile: null, backupOnStandby: false, ...XLOG_NAMES, standbyTimeline: null, ...XLOG_PAUSE,
    systemIdentifier: null, controlCheckpoint: null, walDir: 'pg_xlog',
    recovery: { configFile: 'recovery.conf', signalFiles: false, targetImmediate: true, promoteAtTarget: ['pause_at_recovery_target', 'false'] },
    listWalDir: null, walHoldSlot: null, sessionSetup: SETUP,
  },
  {
    since: 90500, range: '9.5', exclusive: true,
    startBackup: 'SELECT pg_start_backup($1, $2)::text AS lsn',
    stopBackup: EXCLUSIVE_STOP, stopTakesWaitForArchive: false,
    labelFrom: 'data-directory', readLabelFile: "SELECT pg_read_file('backup_label') AS labelfile",
    // Written only when the cluster has tablespaces: missing_ok.
    readSpcmapFile: "SELECT pg_read_file('tablespace_map', 0, 1048576, true) AS spcmapfile",
    backupOnStandby: false, ...XLOG_NAMES, standbyTimeline: null, ...XLOG_PAUSE,
    systemIdentifier: null, controlCheckpoint: null, walDir: 'pg_xlog',
    recovery: RECOVERY_CONF, listWalDir: null, walHoldSlot: null, sessionSetup: SETUP,
  },
  {
    since: 90600, range: '9.6', ...NON_EXCLUSIVE,
    startBackup: 'SELECT pg_start_backup($1, $2, false)::text AS lsn',
    // 9.6's non-exclusive stop has no wait_for_archive argument (it always waits on a primary with archiving).
    stopBackup: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false)', stopTakesWaitForArchive: false,
    ...XLOG_NAMES, ...XLOG_PAUSE, walDir: 'pg_xlog',
    recovery: RECOVERY_CONF, listWalDir: null, walHoldSlot: null, sessionSetup: SETUP,
  },
  {
    since: 100000, range: '10–11', ...NON_EXCLUSIVE,
    startBackup: 'SELECT pg_start_backup($1, $2, false)::text AS lsn',
    stopBackup: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false, $1)', stopTakesWaitForArchive: true,
    ...WAL_NAMES, ...WAL_PAUSE_FLAG, walDir: 'pg_wal',
    // recovery.conf until 11, signal files + ordinary GUCs from 12.
    recovery: RECOVERY_CONF, listWalDir: LIST_WAL_DIR, walHoldSlot: HOLD_SLOT, sessionSetup: SETUP,
  },
  {
    since: 120000, range: '12–13', ...NON_EXCLUSIVE,
    startBackup: 'SELECT pg_start_backup($1, $2, false)::text AS lsn',
    stopBackup: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false, $1)', stopTakesWaitForArchive: true,
    ...WAL_NAMES, ...WAL_PAUSE_FLAG, walDir: 'pg_wal',
    recovery: RECOVERY_SIGNALS, listWalDir: LIST_WAL_DIR, walHoldSlot: HOLD_SLOT, sessionSetup: SETUP,
  },
  {
    since: 140000, range: '14', ...NON_EXCLUSIVE,
    startBackup: 'SELECT pg_start_backup($1, $2, false)::text AS lsn',
    stopBackup: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false, $1)', stopTakesWaitForArchive: true,
    ...WAL_NAMES, ...WAL_PAUSE_STATE, walDir: 'pg_wal',
    recovery: RECOVERY_SIGNALS, listWalDir: LIST_WAL_DIR, walHoldSlot: HOLD_SLOT, sessionSetup: SETUP_14,
  },
  {
    since: 150000, range: '15+', ...NON_EXCLUSIVE,
    startBackup: 'SELECT pg_backup_start($1, $2)::text AS lsn',
    stopBackup: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_backup_stop($1)', stopTakesWaitForArchive: true,
    ...WAL_NAMES, ...WAL_PAUSE_STATE, walDir: 'pg_wal',
    recovery: RECOVERY_SIGNALS, listWalDir: LIST_WAL_DIR, walHoldSlot: HOLD_SLOT, sessionSetup: SETUP_14,
  },
];

/** Major version as PostgreSQL names it: "9.6", "15". */
export function majorOf(versionNum: number): string {
  return versionNum >= 100000 ? String(Math.floor(versionNum / 10000)) : `${Math.floor(versionNum / 10000)}.${Math.floor(versionNum / 100) % 100}`;
}

/** The row for a server_version_num; E_PG for anything older than 9.0. */
export function pgSqlFor(versionNum: number): PgSqlRow {
  if (!Number.isInteger(versionNum) || versionNum < 90000) {
    throw new BlocksnapError('E_PG', `PostgreSQL server_version_num ${versionNum} is not supported: blocksnap needs 9.0 or newer`);
  }
  let row = PG_SQL_TABLE[0]!;
  for (const r of PG_SQL_TABLE) if (versionNum >= r.since) row = r;
  return row;
}

// ---- LSNs and WAL file names -------------------------------------------

const LSN_RE = /^([0-9A-Fa-f]{1,8})\/([0-9A-Fa-f]{1,8})$/;

export function isLsn(s: unknown): s is string {
  return typeof s === 'string' && LSN_RE.test(s);
}

export function parseLsn(s: string): bigint {
  const m = LSN_RE.exec(s);
  if (!m) throw new BlocksnapError('E_PG', `not an LSN: ${JSON.stringify(s)}`);
  return (BigInt(`0x${m[1]}`) << 32n) | BigInt(`0x${m[2]}`);
}

export function formatLsn(v: bigint): string {
  return `${(v >> 32n).toString(16).toUpperCase()}/${(v & 0xffffffffn).toString(16).toUpperCase()}`;
}

/** Timeline from a WAL file name (its first 8 hex digits). */
export function timelineOfWalFile(name: string): number {
  if (!/^[0-9A-F]{24}$/.test(name)) throw new BlocksnapError('E_PG', `not a WAL file name: ${name}`);
  return parseInt(name.slice(0, 8), 16);
}

/** WAL segment file holding `lsn` (the byte at that position) on `timeline`. */
export function walFileName(timeline: number, lsn: bigint, segmentSize: number): string {
  const seg = BigInt(segmentSize);
  const segno = lsn / seg;
  const perId = 0x100000000n / seg;
  const hex = (v: bigint | number) => v.toString(16).toUpperCase().padStart(8, '0');
  return hex(timeline) + hex(segno / perId) + hex(segno % perId);
}
