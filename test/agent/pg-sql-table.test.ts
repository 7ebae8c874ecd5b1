import { describe, expect, it } from 'vitest';
import { DETECT_SQL, formatLsn, majorOf, parseLsn, pgSqlFor, timelineOfWalFile, walFileName } from '../../agent/pg/sql-table.js';
import { isBlocksnapError } from '../../proto/errors.js';

/**
 * The expected SQL for every major from 9.0 to 18, spelled out from the
 * PostgreSQL documentation of each release (not derived from the table).
 */
type Expect = {
  start: string; stop: string; waitArg: boolean; exclusive: boolean; label: string | null; spcmap: string | null;
  onStandby: boolean; walfile: string; current: string; replay: string; receive: string;
  pause: string | null; resume: string | null; state: string | null; confirm: string | null; tli: string | null;
  walDir: string; conf: string; immediate: boolean; promote: [string, string] | null; setup: string[];
};

const xlog = {
  walfile: 'SELECT pg_xlogfile_name($1) AS walfile',
  current: 'SELECT pg_current_xlog_location()::text AS lsn',
  replay: 'SELECT pg_last_xlog_replay_location()::text AS lsn',
  receive: 'SELECT pg_last_xlog_receive_location()::text AS lsn',
  walDir: 'pg_xlog',
};
const wal = {
  walfile: 'SELECT pg_walfile_name($1) AS walfile',
  current: 'SELECT pg_current_wal_lsn()::text AS lsn',
  replay: 'SELECT pg_last_wal_replay_lsn()::text AS lsn',
  receive: 'SELECT pg_last_wal_receive_lsn()::text AS lsn',
  walDir: 'pg_wal',
};
const xlogPause = {
  pause: 'SELECT pg_xlog_replay_pause()',
  resume: 'SELECT pg_xlog_replay_resume()',
  state: "SELECT CASE WHEN pg_is_xlog_replay_paused() THEN 'pause requested' ELSE 'not paused' END AS state",
  confirm: 'stable-replay-lsn',
};
const walPause13 = {
  pause: 'SELECT pg_wal_replay_pause()',
  resume: 'SELECT pg_wal_replay_resume()',
  state: "SELECT CASE WHEN pg_is_wal_replay_paused() THEN 'pause requested' ELSE 'not paused' END AS state",
  confirm: 'stable-replay-lsn',
};
const walPause14 = {
  pause: 'SELECT pg_wal_replay_pause()',
  resume: 'SELECT pg_wal_replay_resume()',
  state: 'SELECT pg_get_wal_replay_pause_state() AS state',
  confirm: 'state',
};
const exclusive = {
  start: 'SELECT pg_start_backup($1, $2)::text AS lsn',
  stop: 'SELECT pg_stop_backup()::text AS lsn, NULL::text AS labelfile, NULL::text AS spcmapfile',
  waitArg: false, exclusive: true, onStandby: false, tli: null,
};
const nonExclusive96to14 = { start: 'SELECT pg_start_backup($1, $2, false)::text AS lsn', exclusive: false, label: null, spcmap: null, onStandby: true, tli: 'SELECT timeline_id AS timeline FROM pg_control_checkpoint()' };
const setup = ['SET statement_timeout = 0'];
// Temporary replication slots arrived in 10 (the third argument); 9.6 has only permanent ones.
const holdSlot = (major: string) => (Number(major.split('.')[0]) >= 10 ? 'SELECT pg_create_physical_replication_slot($1, true, true)' : null);
const setup14 = ['SET statement_timeout = 0', 'SET idle_session_timeout = 0'];

const EXPECTED: Record<string, Expect> = {
  '9.0': {
    ...exclusive, ...xlog, label: "SELECT pg_read_file('backup_label', 0, 1048576) AS labelfile", spcmap: null,
    pause: null, resume: null, state: null, confirm: null, conf: 'recovery.conf', immediate: false, promote: null, setup,
  },
  ...Object.fromEntries(['9.1', '9.2', '9.3'].map((m) => [m, {
    ...exclusive, ...xlog, ...xlogPause, label: "SELECT pg_read_file('backup_label') AS labelfile", spcmap: null,
    conf: 'recovery.conf', immediate: false, promote: null, setup,
  }])),
  '9.4': {
    ...exclusive, ...xlog, ...xlogPause, label: "SELECT pg_read_file('backup_label') AS labelfile", spcmap: null,
    conf: 'recovery.conf', immediate: true, promote: ['pause_at_recovery_target', 'false'], setup,
  },
  '9.5': {
    ...exclusive, ...xlog, ...xlogPause, label: "SELECT pg_read_file('backup_label') AS labelfile",
    spcmap: "SELECT pg_read_file('tablespace_map', 0, 1048576, true) AS spcmapfile",
    conf: 'recovery.conf', immediate: true, promote: ['recovery_target_action', 'promote'], setup,
  },
  '9.6': {
    ...nonExclusive96to14, ...xlog, ...xlogPause,
    stop: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false)', waitArg: false,
    conf: 'recovery.conf', immediate: true, promote: ['recovery_target_action', 'promote'], setup,
  },
  ...Object.fromEntries(['10', '11'].map((m) => [m, {
    ...nonExclusive96to14, ...wal, ...walPause13,
    stop: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false, $1)', waitArg: true,
    conf: 'recovery.conf', immediate: true, promote: ['recovery_target_action', 'promote'], setup,
  }])),
  ...Object.fromEntries(['12', '13'].map((m) => [m, {
    ...nonExclusive96to14, ...wal, ...walPause13,
    stop: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false, $1)', waitArg: true,
    conf: 'postgresql.auto.conf', immediate: true, promote: ['recovery_target_action', 'promote'], setup,
  }])),
  '14': {
    ...nonExclusive96to14, ...wal, ...walPause14,
    stop: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_stop_backup(false, $1)', waitArg: true,
    conf: 'postgresql.auto.conf', immediate: true, promote: ['recovery_target_action', 'promote'], setup: setup14,
  },
  ...Object.fromEntries(['15', '16', '17', '18'].map((m) => [m, {
    ...wal, ...walPause14, start: 'SELECT pg_backup_start($1, $2)::text AS lsn',
    stop: 'SELECT lsn::text AS lsn, labelfile, spcmapfile FROM pg_backup_stop($1)', waitArg: true,
    exclusive: false, label: null, spcmap: null, onStandby: true, tli: 'SELECT timeline_id AS timeline FROM pg_control_checkpoint()',
    conf: 'postgresql.auto.conf', immediate: true, promote: ['recovery_target_action', 'promote'], setup: setup14,
  }])),
};

/** server_version_num of an arbitrary minor release of a major. */
function versionNum(major: string, minor = 7): number {
  const [a, b] = major.split('.').map(Number);
  return a! >= 10 ? a! * 10000 + minor : a! * 10000 + b! * 100 + minor;
}

describe('pgSqlFor: one row per server version', () => {
  it('covers every major from 9.0 to 18', () => {
    expect(Object.keys(EXPECTED).sort((x, y) => versionNum(x) - versionNum(y))).toEqual([
      '9.0', '9.1', '9.2', '9.3', '9.4', '9.5', '9.6', '10', '11', '12', '13', '14', '15', '16', '17', '18',
    ]);
  });

  for (const [major, e] of Object.entries(EXPECTED)) {
    for (const minor of [0, 23]) {
      it(`${major} (minor ${minor}): exact SQL`, () => {
        const r = pgSqlFor(versionNum(major, minor));
        expect(majorOf(versionNum(major, minor))).toBe(major);
        expect(r.startBackup).toBe(e.start);
        expect(r.stopBackup).toBe(e.stop);
        expect(r.stopTakesWaitForArchive).toBe(e.waitArg);
        expect(r.exclusive).toBe(e.exclusive);
        expect(r.labelFrom).toBe(e.exclusive ? 'data-directory' : 'stop-result');
        expect(r.readLabelFile).toBe(e.label);
        expect(r.readSpcmapFile).toBe(e.spcmap);
        expect(r.backupOnStandby).toBe(e.onStandby);
        expect(r.walFileName).toBe(e.walfile);
        expect(r.currentLsn).toBe(e.current);
        expect(r.replayLsn).toBe(e.replay);
        expect(r.receiveLsn).toBe(e.receive);
        expect(r.replayPause).toBe(e.pause);
        expect(r.replayResume).toBe(e.resume);
        expect(r.replayPauseState).toBe(e.state);
        expect(r.pauseConfirmation).toBe(e.confirm);
        expect(r.standbyTimeline).toBe(e.tli);
        expect(r.systemIdentifier).toBe(e.tli ? 'SELECT system_identifier::text AS sysid FROM pg_control_system()' : null);
        expect(r.controlCheckpoint).toBe(e.tli ? 'SELECT checkpoint_lsn::text AS lsn FROM pg_control_checkpoint()' : null);
        expect(r.walDir).toBe(e.walDir);
        expect(r.recovery.configFile).toBe(e.conf);
        expect(r.recovery.signalFiles).toBe(e.conf === 'postgresql.auto.conf');
        expect(r.recovery.targetImmediate).toBe(e.immediate);
        expect(r.recovery.promoteAtTarget).toEqual(e.promote);
        expect([...r.sessionSetup]).toEqual(e.setup);
        expect(r.walHoldSlot).toBe(holdSlot(major));
        // pg_ls_waldir() arrived in 10.
        expect(r.listWalDir).toBe(Number(major.split('.')[0]) >= 10 ? 'SELECT name FROM pg_ls_waldir()' : null);
      });
    }
  }

  it('refuses servers older than 9.0 with E_PG', () => {
    for (const v of [80400, 0, 89999, Number.NaN]) {
      let err: unknown;
      try {
        pgSqlFor(v);
      } catch (e) {
        err = e;
      }
      expect(isBlocksnapError(err, 'E_PG')).toBe(true);
      expect((err as Error).message).toMatch(/not supported: blocksnap needs 9\.0 or newer/);
    }
  });

  it('uses the 15+ row for versions after 18', () => {
    expect(pgSqlFor(190002).startBackup).toBe('SELECT pg_backup_start($1, $2)::text AS lsn');
  });

  it('detects version and role with SQL every version has', () => {
    expect(DETECT_SQL).toBe("SELECT current_setting('server_version_num')::int AS version, pg_is_in_recovery() AS in_recovery, pg_backend_pid() AS pid");
  });
});

describe('LSNs and WAL file names', () => {
  it('parses and formats LSNs', () => {
    expect(parseLsn('0/0')).toBe(0n);
    expect(parseLsn('16/B374D848')).toBe((0x16n << 32n) | 0xb374d848n);
    expect(formatLsn((0x16n << 32n) | 0xb374d848n)).toBe('16/B374D848');
    expect(parseLsn('0/3000028') < parseLsn('0/30000A0')).toBe(true);
    expect(() => parseLsn('0/')).toThrow(/not an LSN/);
    expect(() => parseLsn('1/123456789')).toThrow(/not an LSN/);
  });

  it('names WAL segments like PostgreSQL (16 MiB and 1 GiB segments)', () => {
    expect(walFileName(1, parseLsn('0/3000028'), 16 << 20)).toBe('000000010000000000000003');
    expect(walFileName(2, parseLsn('16/B374D848'), 16 << 20)).toBe('0000000200000016000000B3');
    expect(walFileName(1, parseLsn('16/B374D848'), 1 << 30)).toBe('000000010000001600000002');
    expect(timelineOfWalFile('0000000A0000000100000002')).toBe(10);
    expect(() => timelineOfWalFile('00000001.history')).toThrow(/not a WAL file name/);
  });
});
