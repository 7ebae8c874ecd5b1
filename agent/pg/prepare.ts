/**
 * Makes a restored or exported data directory startable as of an image:
 * PostgreSQL replays from the checkpoint named in the image's backup label to
 * the image's stop LSN, then promotes — or, as a standby, keeps following a
 * primary.
 *
 * What it writes (owned by the data directory's owner, mode 0600, each file
 * temp + fsync + rename, then the directory fsync'ed):
 *   backup_label      the label the stop call returned (required: without it
 *                     PostgreSQL would crash-recover from the checkpoint in
 *                     pg_control, which for a copy not taken at one instant is
 *                     the wrong one — pages copied before it would be trusted)
 *   tablespace_map    only when the backup had tablespaces; a stale one is removed
 *   recovery config   ≤ 11: recovery.conf (rewritten whole; standby_mode there);
 *                     12+: recovery.signal or standby.signal, and the settings
 *                     in postgresql.auto.conf (read last, so they win over
 *                     postgresql.conf). Every recovery_target*, restore_command,
 *                     primary_conninfo and primary_slot_name line the source
 *                     carried is dropped first: two targets make 12+ refuse to
 *                     start, and the source standby's slot belongs to it.
 * Settings, primary (promote):
 *   recovery_target = 'immediate' (9.4+) and promote there (9.5+
 *   recovery_target_action = 'promote', 9.4 pause_at_recovery_target =
 *   false; both default to pausing): recovery ends exactly where the backup
 *   became consistent — the image's stop point — even if the archive holds
 *   more WAL. Not recovery_target_lsn = stop LSN: a target LSN is "reached"
 *   only by reading a record at or after it, so an image whose WAL ends right
 *   at its stop point (a standby image of an idle primary) is refused by 14+
 *   with "recovery ended before configured recovery target was reached"
 *   (seen on 15). A restore that lacks the WAL up to the stop point still
 *   fails, with "WAL ends before end of online backup". ≤ 9.3 have no target:
 *   they replay all the WAL they find.
 *   A backup taken on a standby (14+) gets no target: see endsAtItsWalEnd.
 *   recovery_target_timeline = the stop timeline (the default 'latest' could
 *   follow a timeline forked after the image).
 *   restore_command = the given one, else '/bin/false': archive recovery
 *   demands one, and a failing one means "use pg_wal only".
 * Settings, standby: primary_conninfo, restore_command if given,
 *   recovery_target_timeline = 'latest', no target (a target would stop it).
 * archive_mode = 'off' in postgresql.auto.conf (9.4+) unless keepArchiving: a
 *   restored copy promoted to a new timeline must not push its history file
 *   into the source's archive, where the source's own PITR would follow it.
 * postmaster.pid is removed, after checking no postmaster runs on the directory.
 * pg_replslot/ is emptied: the source's replication slots are not the copy's
 *   (PostgreSQL's backup docs advise leaving them out; pg_basebackup never
 *   copies them). Kept, a slot whose client follows the source would hold
 *   the copy's WAL for good — every segment since the image, in a mount's
 *   overlay or on the restored volume.
 * A copy that ends recovery at the stop point loses pg_wal's segment files
 *   recovery never reads: recycled ones past the stop LSN's segment and
 *   those before the label's start segment unless still `.ready` (removeUnreadWal).
 */
import { lstat, readdir, readFile, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { fsyncDir, writeDurable } from '../../proto/shared/durable-file.js';
import { processCwd } from '../../proto/shared/proc.js';
import { BlocksnapError } from '../../proto/errors.js';
import { majorOf, parseLsn, pgSqlFor } from './sql-table.js';

export interface PrepareOptions {
  /** backup_label contents from the image (unquiesce's labelFile). */
  labelFile: string;
  spcmapFile?: string | null;
  stopLsn: string;
  timeline?: number | null;
  /** server_version_num of the server the image was taken from. */
  version: number;
  asStandby?: boolean;
  /** libpq conninfo of the primary to follow (standby). */
  primaryConninfo?: string;
  /** Fetches archived WAL, `%f`/`%p` as in PostgreSQL. */
  restoreCommand?: string;
  /** Leave archive_mode as the source had it. Default false. */
  keepArchiving?: boolean;
  /** The copy's port (postgresql.auto.conf `port`), so it can run beside the source. */
  port?: number;
  /**
   * Pause at the image's stop point instead of promoting there (9.4+); the
   * caller then promotes (promote file + SIGUSR1, as pg_ctl promote does):
   * a triggered promotion ends recovery with an end-of-recovery record and a
   * background checkpoint, where promoting at the target waits for a full
   * checkpoint first (the instant mount's choice).
   */
  pauseAtTarget?: boolean;
}

export interface PrepareResult {
  written: string[];
  removed: string[];
  configFile: string;
  settings: Record<string, string>;
}

const RECOVERY_KEYS = /^(recovery_target\w*|pause_at_recovery_target|restore_command|primary_conninfo|primary_slot_name|standby_mode)$/i;

/** A value as postgresql.conf quotes it (the GUC lexer takes backslash escapes). */
export function quoteConf(v: string): string {
  if (/[\n\r\0]/.test(v)) throw new BlocksnapError('E_USAGE', `configuration value contains a line break: ${JSON.stringify(v)}`);
  return `'${v.replace(/\\/g, '\\\\').replace(/'/g, "''")}'`;
}

/** The durable write, owned by the user PostgreSQL runs as (the agent is root; a root-owned 0600 file is unreadable to the server). */
async function writeOwned(file: string, data: string, owner: { uid: number; gid: number }): Promise<void> {
  try {
    await writeDurable(file, (fh) => fh.writeFile(data), { owner });
  } catch (e) {
    throw new BlocksnapError('E_STORE_IO', `cannot write ${file}`, { cause: e });
  }
}

async function removeIfPresent(file: string, removed: string[], as = path.basename(file)): Promise<void> {
  try {
    await rm(file);
    removed.push(as);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new BlocksnapError('E_STORE_IO', `cannot remove ${file}`, { cause: e });
  }
}

const WAL_SEGMENT = /^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$/;

/**
 * Removes pg_wal's segment files this recovery never reads: those past the
 * stop LSN's segment (written before the snapshot, which precedes the stop
 * point, they are recycled files) and those before the label's start
 * segment (WAL older than the backup's checkpoint: recovery starts at its
 * redo point). A segment before the start still marked `.ready` (not yet
 * archived by the source) stays; the `.done` of a removed one goes with it.
 * The segment size is the segment files' own size; without a plausible one
 * (or with pg_wal a symlink, whose target is the source host's path) nothing
 * is removed. The files are looked at and removed concurrently: each is a
 * metadata round trip through the mount's block device.
 */
async function removeUnreadWal(dir: string, startLsn: string, stopLsn: string, removed: string[]): Promise<void> {
  const walDir = path.join(dir, 'pg_wal');
  const st = await lstat(walDir).catch(() => null);
  if (!st?.isDirectory()) return;
  const names = (await readdir(walDir)).filter((n) => WAL_SEGMENT.test(n));
  const found = await Promise.all(names.map(async (name) => {
    const f = await lstat(path.join(walDir, name)).catch(() => null);
    const m = WAL_SEGMENT.exec(name)!;
    return f?.isFile() ? { name, hi: parseInt(m[2]!, 16), lo: parseInt(m[3]!, 16), size: f.size } : null;
  }));
  const segs = found.filter((x) => x !== null);
  const size = Math.max(0, ...segs.map((x) => x.size));
  // wal_segment_size: a power of two from 1 MiB to 1 GiB.
  if (size < 2 ** 20 || size > 2 ** 30 || (size & (size - 1)) !== 0) return;
  const perId = 2 ** 32 / size;
  const startSeg = parseLsn(startLsn) / BigInt(size);
  const stopSeg = parseLsn(stopLsn) / BigInt(size);
  const status = path.join(walDir, 'archive_status');
  // allSettled: a failed removal is reported only once no other one is still running on the directory.
  const done = await Promise.allSettled(segs.map(async (x) => {
    const seg = BigInt(x.hi * perId + x.lo);
    if (seg > stopSeg) return removeIfPresent(path.join(walDir, x.name), removed, `pg_wal/${x.name}`);
    if (seg >= startSeg) return;
    const ready = await lstat(path.join(status, `${x.name}.ready`)).then(() => true, () => false);
    if (ready) return;
    await removeIfPresent(path.join(walDir, x.name), removed, `pg_wal/${x.name}`);
    await removeIfPresent(path.join(status, `${x.name}.done`), removed, `pg_wal/archive_status/${x.name}.done`);
  }));
  const failed = done.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/** Removes every replication slot of the source (pg_replslot/NAME directories, 9.4+); the directory stays. */
async function removeReplicationSlots(dir: string, removed: string[]): Promise<void> {
  const slots = path.join(dir, 'pg_replslot');
  let names: string[];
  try {
    names = await readdir(slots);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return; // before 9.4, or none ever made
    throw new BlocksnapError('E_STORE_IO', `cannot read ${slots}`, { cause: e });
  }
  if (names.length === 0) return;
  for (const name of names) {
    try {
      await rm(path.join(slots, name), { recursive: true });
    } catch (e) {
      throw new BlocksnapError('E_STORE_IO', `cannot remove replication slot ${path.join(slots, name)}`, { cause: e });
    }
    removed.push(`pg_replslot/${name}`);
  }
  await fsyncDir(slots);
}

/** Refuses a directory a live postmaster runs on: its pid file is the only thing keeping a second one out. */
async function assertNoPostmaster(dir: string): Promise<void> {
  const first = await readFile(path.join(dir, 'postmaster.pid'), 'utf8').then((t) => t.split('\n')[0]!.trim(), () => '');
  if (!/^\d+$/.test(first)) return;
  const cwd = await processCwd(Number(first));
  if (cwd && path.resolve(cwd) === path.resolve(dir)) {
    throw new BlocksnapError('E_BUSY', `a postmaster (pid ${first}) is running on ${dir}`);
  }
}

/** The label's START WAL LOCATION: the backup checkpoint's redo point, where recovery starts. */
function startLsnOf(label: string): string {
  const m = /^START WAL LOCATION: ([0-9A-F]+\/[0-9A-F]+) /.exec(label);
  if (!m) throw new BlocksnapError('E_FORMAT', 'the backup label does not start with "START WAL LOCATION: <lsn> "');
  return m[1]!;
}

function checkLabel(label: string, stopLsn: string): void {
  const start = startLsnOf(label);
  if (parseLsn(stopLsn) < parseLsn(start)) {
    throw new BlocksnapError('E_FORMAT', `stop LSN ${stopLsn} is before the label's start ${start}: label and stop point are from different backups`);
  }
}

/**
 * A backup taken on a standby, 14+: recovery gets no target and replays the
 * image's pg_wal to its end. 'immediate' stops only *before* a record read
 * after the consistency point (or after a commit/abort record): a standby
 * paused at the end of what it had received — an idle primary's last record
 * a checkpoint or running-xacts — yields an image whose WAL ends exactly at
 * its consistency point (the label's end, the standby's minRecoveryPoint),
 * and 14+ then refuses with "recovery ended before configured recovery
 * target was reached" (seen in the LVM e2e: "record with incorrect prev-link
 * … at 0/B000060", redo done at 0/B000028, the stop point 0/B000060). Without a
 * target the copy is consistent at the same point and may replay, past it,
 * what the standby had received up to the snapshot (real WAL of the same
 * history, bounded by removeUnreadWal). ≤ 13 ends recovery at the WAL's end
 * whatever the target.
 */
function endsAtItsWalEnd(o: PrepareOptions): boolean {
  return o.version >= 140000 && /^BACKUP FROM: standby$/m.test(o.labelFile);
}

/** Every refusal prepareDataDir makes, without writing anything: callers that write first (WAL) run it before. */
export async function checkDataDir(dir: string, o: PrepareOptions): Promise<void> {
  pgSqlFor(o.version);
  const major = majorOf(o.version);
  const pgVersion = await readFile(path.join(dir, 'PG_VERSION'), 'utf8').then((t) => t.trim(), () => null);
  if (pgVersion === null) throw new BlocksnapError('E_PG', `${dir} is not a PostgreSQL data directory (no PG_VERSION)`);
  if (pgVersion !== major) throw new BlocksnapError('E_PG', `${dir} is a PostgreSQL ${pgVersion} data directory, but the image is from ${major}`);
  checkLabel(o.labelFile, o.stopLsn);
  if (o.asStandby && !o.primaryConninfo && !o.restoreCommand) {
    throw new BlocksnapError('E_USAGE', 'a standby needs a primary conninfo or a restore command to get WAL from');
  }
  await assertNoPostmaster(dir);
}

export async function prepareDataDir(dir: string, o: PrepareOptions): Promise<PrepareResult> {
  const sql = pgSqlFor(o.version);
  await checkDataDir(dir, o);
  const st = await stat(dir);
  const owner = { uid: st.uid, gid: st.gid };
  const written: string[] = [];
  const removed: string[] = [];
  const put = async (name: string, data: string) => {
    await writeOwned(path.join(dir, name), data, owner);
    written.push(name);
  };

  await removeIfPresent(path.join(dir, 'postmaster.pid'), removed);
  await put('backup_label', o.labelFile);
  if (o.spcmapFile) await put('tablespace_map', o.spcmapFile);
  else await removeIfPresent(path.join(dir, 'tablespace_map'), removed);
  for (const f of ['recovery.conf', 'recovery.signal', 'standby.signal']) await removeIfPresent(path.join(dir, f), removed);
  await removeReplicationSlots(dir, removed);

  // A copy that ends recovery at the stop point (and promotes) has no use
  // for the source's recycled WAL files past it, nor for the WAL before the
  // backup's checkpoint; PostgreSQL removes or recycles them at the
  // promotion's checkpoint, each with fsyncs (durable rename) — dozens on a
  // bigger database, measured as what made an 8 GiB mount's promotion
  // slower than a 1 GiB one. Gone here they cost nothing.
  if (!o.asStandby && sql.recovery.targetImmediate) await removeUnreadWal(dir, startLsnOf(o.labelFile), o.stopLsn, removed);

  const settings: Record<string, string> = {};
  if (o.asStandby) {
    if (!sql.recovery.signalFiles) settings.standby_mode = 'on';
    if (o.primaryConninfo) settings.primary_conninfo = o.primaryConninfo;
    if (o.restoreCommand) settings.restore_command = o.restoreCommand;
    settings.recovery_target_timeline = 'latest';
  } else {
    settings.restore_command = o.restoreCommand ?? '/bin/false';
    if (sql.recovery.targetImmediate && !endsAtItsWalEnd(o)) settings.recovery_target = 'immediate';
    if (sql.recovery.promoteAtTarget) {
      const [name, promote] = sql.recovery.promoteAtTarget;
      settings[name] = !o.pauseAtTarget ? promote : name === 'pause_at_recovery_target' ? 'true' : 'pause';
    }
    if (o.timeline) settings.recovery_target_timeline = String(o.timeline);
  }
  if (o.port !== undefined) {
    if (!Number.isInteger(o.port) || o.port < 1 || o.port > 65535) throw new BlocksnapError('E_USAGE', `invalid port ${o.port}`);
    settings.port = String(o.port);
  }
  const lines = Object.entries(settings).map(([k, v]) => `${k} = ${quoteConf(v)}`);
  const header = `# written by blocksnap prepare: ${o.asStandby ? 'a standby of the image' : `recovery to the image's stop point ${o.stopLsn}`}\n`;
  const archiveOff = !o.keepArchiving && o.version >= 90400;

  let configFile: string;
  if (sql.recovery.signalFiles) {
    configFile = 'postgresql.auto.conf';
    if (archiveOff) {
      settings.archive_mode = 'off';
      lines.push(`archive_mode = 'off'`);
    }
    await rewriteAutoConf(dir, header, lines, put);
    await put(o.asStandby ? 'standby.signal' : 'recovery.signal', '');
  } else {
    configFile = 'recovery.conf';
    await put('recovery.conf', header + lines.join('\n') + '\n');
    if (archiveOff) {
      settings.archive_mode = 'off';
      await rewriteAutoConf(dir, '', [`archive_mode = 'off'`], put);
    }
  }
  await fsyncDir(dir);
  return { written, removed, configFile, settings };
}

/** Keeps every line of postgresql.auto.conf except recovery settings and the ones we set, then appends ours. */
async function rewriteAutoConf(dir: string, header: string, lines: string[], put: (name: string, data: string) => Promise<void>): Promise<void> {
  const file = path.join(dir, 'postgresql.auto.conf');
  const old = await readFile(file, 'utf8').catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return '';
    throw new BlocksnapError('E_STORE_IO', `cannot read ${file}`, { cause: e });
  });
  const ours = new Set(lines.map((l) => l.split(' ')[0]!.toLowerCase()));
  const kept = old.split('\n').filter((l) => {
    const key = /^\s*([A-Za-z_][\w.]*)\s*(=|\s)/.exec(l)?.[1];
    return !(key && (RECOVERY_KEYS.test(key) || ours.has(key.toLowerCase()))) && !l.startsWith('# written by blocksnap prepare');
  });
  while (kept.length && kept[kept.length - 1] === '') kept.pop();
  const base = kept.length ? `${kept.join('\n')}\n` : '# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n';
  await put('postgresql.auto.conf', base + header + lines.join('\n') + '\n');
}
