import { mkdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { BlocksnapError } from '../../proto/errors.js';
import { prepareDataDir } from '../../agent/pg/prepare.js';
import { PgQuiescer } from '../../agent/pg/pg-quiescer.js';
import { parseLsn } from '../../agent/pg/sql-table.js';
import { chownTo, PG15_CLIENT_BIN, type PgServerBuild } from './version-lab.js';
import { PgCluster } from './pg-cluster.js';

/**
 * Lab: a streaming standby of `primary` in `dataDir` (which must not
 * exist yet; its parent must be traversable by the postgres user), for any
 * version 10+ (the PostgreSQL matrix tests and the quiesce bench share it).
 *   ≤ 15: pg_basebackup of the Debian 15 clients (they refuse newer servers),
 *         then (not -R: the 15 client writes libpq options an older
 *         walreceiver rejects)
 *         12–15: standby.signal + primary_conninfo in postgresql.auto.conf;
 *         10–11: they know no signal files and reject primary_conninfo in
 *         postgresql.auto.conf as an unknown setting: a recovery.conf with
 *         standby_mode = on instead;
 *   16+:  a copy of the data directory taken during a backup (PgQuiescer),
 *         made a standby by `prepareDataDir(asStandby)` — what a user does
 *         with a blocksnap image and `prepare --as-standby`.
 * The standby is started with `settings`; on failure whatever was started is
 * destroyed before the error is thrown.
 */
export interface StandbyOptions {
  primary: PgCluster;
  build: PgServerBuild;
  dataDir: string;
  settings?: Record<string, string>;
  applicationName?: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function createStreamingStandby(o: StandbyOptions): Promise<PgCluster> {
  const conninfo = `host=127.0.0.1 port=${o.primary.port} user=postgres application_name=${o.applicationName ?? 'standby'}`;
  if (o.build.versionNum < 160000) {
    await mkdir(o.dataDir, { mode: 0o700 });
    await chownTo(o.dataDir);
    const { uid, gid } = await stat(o.dataDir);
    const r = await execa(path.join(PG15_CLIENT_BIN, 'pg_basebackup'), ['-D', o.dataDir, '-d', conninfo, '-X', 'stream', '-c', 'fast'], { uid, gid, cwd: '/', reject: false, stdin: 'ignore' });
    if (r.exitCode !== 0) throw new BlocksnapError('E_PG', `pg_basebackup into ${o.dataDir} failed: ${String(r.stderr)}`);
    if (o.build.versionNum < 120000) {
      const conf = path.join(o.dataDir, 'recovery.conf');
      await writeFile(conf, `standby_mode = 'on'\nprimary_conninfo = '${conninfo}'\n`, { mode: 0o600 });
      await chownTo(conf);
    } else {
      await writeFile(path.join(o.dataDir, 'postgresql.auto.conf'), `primary_conninfo = '${conninfo}'\n`, { flag: 'a' });
      await writeFile(path.join(o.dataDir, 'standby.signal'), '');
      await chownTo(path.join(o.dataDir, 'standby.signal'));
    }
  } else {
    const q = new PgQuiescer({ connection: { ...o.primary.connectionConfig(), application_name: 'test-standby-seed' }, role: 'primary' });
    try {
      await q.connect();
      await q.quiesce({ label: 'standby-seed', fast: true });
      await execa('cp', ['-a', o.primary.dataDir, o.dataDir]);
      const img = await q.unquiesce();
      await prepareDataDir(o.dataDir, {
        labelFile: img.labelFile!, spcmapFile: img.spcmapFile, stopLsn: img.stopLsn!, timeline: img.timeline, version: img.version,
        asStandby: true, primaryConninfo: conninfo,
      });
    } finally {
      await q.close();
    }
  }
  const s = new PgCluster({ dataDir: o.dataDir, binDir: o.build.binDir, settings: o.settings });
  try {
    await s.start();
  } catch (e) {
    await s.destroy().catch(() => undefined);
    throw e;
  }
  return s;
}

/** The primary's current WAL insert position. */
export async function currentLsn(primary: PgCluster): Promise<string> {
  return (await primary.query<{ lsn: string }>('SELECT pg_current_wal_lsn()::text AS lsn'))[0]!.lsn;
}

/** Waits until the standby has replayed up to `lsn`; returns its replay position. */
export async function waitReplayed(standby: PgCluster, lsn: string, timeoutMs = 30_000): Promise<string> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const [r] = await standby.query<{ lsn: string | null }>('SELECT pg_last_wal_replay_lsn()::text AS lsn');
    if (r!.lsn !== null && parseLsn(r!.lsn) >= parseLsn(lsn)) return r!.lsn;
    if (Date.now() > end) throw new BlocksnapError('E_TIMEOUT', `standby replay at ${r!.lsn ?? 'none'}, not ${lsn}, after ${timeoutMs} ms`);
    await sleep(20);
  }
}

/** `pg_get_wal_replay_pause_state()` on 14+, the pause flag before. */
export async function replayPauseState(standby: PgCluster, versionNum: number): Promise<string> {
  if (versionNum >= 140000) return (await standby.query<{ s: string }>('SELECT pg_get_wal_replay_pause_state() AS s'))[0]!.s;
  return (await standby.query<{ p: boolean }>('SELECT pg_is_wal_replay_paused() AS p'))[0]!.p ? 'paused' : 'not paused';
}
