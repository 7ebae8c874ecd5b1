/**
 * The LocalMounter (mount-port.ts) over NBD: for each export of the grant,
 * attach (NbdAttacher: nbdfuse + loop here, kernel nbd-client where
 * /dev/nbd* exists), mount its filesystem; find the data directory; put the
 * WAL the image needs into it; prepare it (agent/pg/prepare.ts: label,
 * recovery to the stop point or standby, the copy's port); start PostgreSQL
 * as the directory's owner; wait for its first answer.
 *
 * Every step is recorded in the mount's state file before it is taken
 * (mount-state.ts, mount-steps.ts); a failure releases every step taken, in
 * reverse, before it is thrown; `unmount` and `cleanupOrphans` release the
 * same way from the record. Layout on the host:
 *   STATE/mounts/<id>.json          the state file (root, 0600)
 *   STATE/mounts/<id>.d/            nbdfuse's FUSE dirs, pid files and logs (root, 0700)
 *   /run/blocksnap-mounts/<id>/     default target: the filesystems (one export: the
 *                                   filesystem itself; several: one dir per volume).
 *                                   Not under the state dir: PostgreSQL runs as the data
 *                                   directory's owner and must traverse every parent,
 *                                   while the state dir is root's alone.
 *   /run/blocksnap-mounts/<id>.run/ the copy's socket dir and server log (owner's)
 */
import { chmod, chown, mkdir, open, readFile, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { execa } from 'execa';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { checkDataDir, prepareDataDir, type PrepareOptions } from '../pg/prepare.js';
import { majorOf, pgSqlFor } from '../pg/sql-table.js';
import type { LocalMount, LocalMountOptions, LocalMounter, MountGrant, MountGrantExport, WalSource } from './mount-port.js';
import { defaultAttacher, type NbdAttacher } from './nbd-attacher.js';
import { MountJournal, mountsDir, ownerAlive, readMountStates, checkMountId, type MountState } from './mount-state.js';
import { releaseSteps, type MountStep } from './mount-steps.js';
import { freePort, ownerOf, portWasTaken, startPostmaster, waitFirstAnswer, type StartPgOptions, type WaitOptions } from './pg-start.js';
import { findDataDir } from './pg-data-dir.js';
import { pointWalLinkIntoCopy } from './wal-link.js';

export interface NbdLocalMounterOptions {
  /** The agent's state directory (mount state files go to STATE/mounts/). */
  stateDir: string;
  attacher?: NbdAttacher;
  log?: Logger;
  /** Where default targets and socket dirs go (default /run/blocksnap-mounts). */
  runBase?: string;
  /** Server binaries for a server_version_num (default Debian's /usr/lib/postgresql/MAJOR/bin). */
  binDirFor?: (serverVersion: number) => string;
  /**
   * The CA the agent trusts for the appliance (config caFile, as for wss://):
   * nbds:// exports are verified against it (libnbd's tls-certificates=DIR
   * with DIR/ca-cert.pem); without it, against the system's trust store.
   */
  ca?: Buffer;
  /** Settings for every start of a copy, over the defaults below. */
  pgSettings?: Record<string, string>;
  /** How long PostgreSQL may take to answer (default 300 s: a big image's replay). */
  startTimeoutMs?: number;
  /** ext4 without barriers while preparing, one flush before PostgreSQL starts (default true; see mountOptions). */
  deferFlush?: boolean;
}

/** What a mount took, step by step, in seconds (the benchmark's breakdown). */
export type MountPhases = Record<'attach' | 'mount' | 'wal' | 'prepare' | 'start' | 'total', number>;

export interface NbdLocalMount extends LocalMount {
  phases: MountPhases;
}

/**
 * How a primary copy leaves recovery: prepared to PAUSE at the image's stop
 * point (recovery_target = 'immediate'), then promoted by us (promote file +
 * SIGUSR1, pg_ctl promote's way). A triggered promotion writes an
 * end-of-recovery record and lets the checkpoint run in the background;
 * recovery_target_action = 'promote' instead waits for a full end-of-recovery
 * checkpoint before the first write may happen (measured: ≈1.7 s of a 4.2 s
 * mount of a 1 GiB pgbench image under load). Same durability either way.
 *
 * Per-start settings of a copy (command line, never written into it):
 * - hot_standby = on: the copy must answer while paused at its target (and a
 *   standby copy must answer at all), whatever the source had.
 * - recovery_init_sync_method = syncfs (14+): a server starting after a crash
 *   (which a snapshot is, to PostgreSQL) first fsyncs every file of the data
 *   directory; over NBD that is one open + fsync per file. syncfs is one call
 *   per filesystem, with the same guarantee. fsync stays on: a writable copy
 *   is a database someone may use, and a crash of the host must not corrupt
 *   it silently (its writes land in the appliance's overlay).
 */
export function defaultPgSettings(serverVersion: number): Record<string, string> {
  return { hot_standby: 'on', ...(serverVersion >= 140000 ? { recovery_init_sync_method: 'syncfs' } : {}) };
}

async function isEmptyDir(dir: string): Promise<boolean | undefined> {
  try {
    return (await readdir(dir)).length === 0;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

async function fsType(device: string): Promise<string> {
  const r = await execa('blkid', ['-p', '-o', 'value', '-s', 'TYPE', device], { reject: false, stdin: 'ignore', timeout: 30_000 });
  return String(r.stdout).trim();
}

/**
 * mount(8) options: a read-only mount must not replay a journal
 * (noload/norecovery); XFS copies beside their source need nouuid. A
 * writable ext4 is mounted with barrier=0 while the mount is being prepared
 * (journal replay, WAL, label, recovery settings): each fsync there would be
 * a flush through loop, FUSE and NBD into the overlay on the appliance's
 * disk (≈0.1–0.2 s each, measured here under load), and nothing of it needs
 * to be durable before PostgreSQL starts — a mount does not outlive its
 * host. `barrierOn` turns barriers back on and syncs the filesystem (one
 * flush) before the postmaster is spawned, so PostgreSQL runs with every
 * fsync meaning what it says.
 */
export function mountOptions(type: string, writable: boolean, deferFlush = true): string[] {
  const o = writable ? ['noatime'] : ['ro'];
  if (type === 'xfs') o.push('nouuid', ...(writable ? [] : ['norecovery']));
  else if (type === 'ext4' || type === 'ext3') o.push(...(writable ? (deferFlush ? ['barrier=0'] : []) : ['noload']));
  return o;
}

/** Barriers back on, then syncfs: what the preparation wrote is on the device, flushed, before PostgreSQL starts. */
async function barrierOn(mp: string): Promise<void> {
  const r = await execa('mount', ['-o', 'remount,barrier=1', mp], { reject: false, stdin: 'ignore', timeout: 60_000 });
  if (r.exitCode !== 0) throw new BlocksnapError('E_DEVICE', `remount ${mp} with barriers failed: ${String(r.stderr).trim()}`, { cause: r });
  const s = await execa('sync', ['-f', mp], { reject: false, stdin: 'ignore', timeout: 300_000 });
  if (s.exitCode !== 0) throw new BlocksnapError('E_DEVICE', `sync -f ${mp} failed: ${String(s.stderr).trim()}`, { cause: s });
}

/** server_version_num of a data directory's major (PG_VERSION): enough to pick binaries and SQL. */
async function versionOf(dataDir: string): Promise<number> {
  const v = (await readFile(path.join(dataDir, 'PG_VERSION'), 'utf8')).trim();
  const m = /^(\d+)(?:\.(\d+))?$/.exec(v);
  if (!m) throw new BlocksnapError('E_PG', `${dataDir}/PG_VERSION says ${JSON.stringify(v)}`);
  return Number(m[1]) >= 10 ? Number(m[1]) * 10000 : Number(m[1]) * 10000 + Number(m[2] ?? 0) * 100;
}

/**
 * A crash-consistent image (no label): PostgreSQL's crash recovery from
 * pg_control is right for a snapshot taken at one instant. Only the source's
 * postmaster.pid goes (its pid may be a live process on this host, and
 * PostgreSQL would refuse to start); an image of a standby is refused (it
 * would follow the source's primary with the source's slot).
 */
async function prepareCrashConsistent(dataDir: string): Promise<void> {
  for (const f of ['standby.signal', 'recovery.signal', 'recovery.conf']) {
    if (await stat(path.join(dataDir, f)).then(() => true, () => false)) {
      throw new BlocksnapError('E_USAGE', `the crash-consistent image holds ${f}: a standby's image needs its backup label to be mounted`);
    }
  }
  await rm(path.join(dataDir, 'postmaster.pid'), { force: true });
}

const SPARSE_BLOCK = 64 * 1024;
const ZEROS = Buffer.alloc(SPARSE_BLOCK);

/**
 * Writes `bytes` leaving all-zero 64 KiB blocks as holes (they read as
 * zeros). A WAL segment past the image's stop point is mostly zeros, and
 * every byte written here crosses loop, FUSE and NBD into the overlay.
 */
export async function writeSparse(file: string, bytes: Buffer): Promise<void> {
  const fh = await open(file, 'wx', 0o600);
  try {
    let runStart = -1;
    const flush = async (end: number) => {
      if (runStart >= 0) await fh.write(bytes, runStart, end - runStart, runStart);
      runStart = -1;
    };
    for (let at = 0; at < bytes.length; at += SPARSE_BLOCK) {
      const end = Math.min(bytes.length, at + SPARSE_BLOCK);
      const zero = bytes.subarray(at, end).equals(ZEROS.subarray(0, end - at));
      if (zero) await flush(at);
      else if (runStart < 0) runStart = at;
    }
    await flush(bytes.length);
    await fh.truncate(bytes.length);
  } finally {
    await fh.close();
  }
}

export class NbdLocalMounter implements LocalMounter {
  private readonly mounts = new Map<string, MountJournal>();
  private readonly inProgress = new Set<string>();
  private readonly stateDir: string;
  private readonly runBase: string;

  /** nbds:// with a configured CA: the CA written to WORKDIR/tls/ca-cert.pem (removed with the work dir), that directory returned. */
  private async tlsCertificates(uri: string, workDir: string): Promise<string | undefined> {
    if (!uri.startsWith('nbds://') || !this.o.ca) return undefined;
    const dir = path.join(workDir, 'tls');
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await writeFile(path.join(dir, 'ca-cert.pem'), this.o.ca, { mode: 0o600 });
    return dir;
  }

  constructor(private readonly o: NbdLocalMounterOptions) {
    this.stateDir = path.resolve(o.stateDir);
    this.runBase = o.runBase ?? '/run/blocksnap-mounts';
  }

  async mount(grant: MountGrant, wal: WalSource, opts: LocalMountOptions = {}): Promise<NbdLocalMount> {
    const t0 = performance.now();
    const since = () => (performance.now() - t0) / 1000;
    checkMountId(grant.mountId);
    const pgExports = grant.exports.filter((e) => e.pg);
    if (!grant.exports.length) throw new BlocksnapError('E_USAGE', `mount ${grant.mountId}: the grant has no exports`);
    // The members of an image set carry one capture's PostgreSQL part (the same label): one PostgreSQL.
    if (new Set(pgExports.map((e) => `${e.pg!.labelFile}\0${e.pg!.stopLsn}`)).size > 1) {
      throw new BlocksnapError('E_USAGE', `mount ${grant.mountId}: ${pgExports.length} exports carry PostgreSQL data of different backups; at most one backup may`);
    }
    // No export with PostgreSQL data: a crash-consistent image (PostgreSQL's own crash recovery, from pg_control).
    const pgx = pgExports[0];
    const info = pgx?.pg;
    if (!grant.writable) throw new BlocksnapError('E_USAGE', `mount ${grant.mountId}: PostgreSQL cannot run on a read-only grant`);
    if (!info && opts.asStandby) throw new BlocksnapError('E_USAGE', `mount ${grant.mountId}: a crash-consistent image cannot be mounted as a standby (no backup label to start from)`);
    if (info?.spcmapFile) throw new BlocksnapError('E_USAGE', `mount ${grant.mountId}: images with tablespaces cannot be mounted yet (their links name the source's paths)`);
    if (this.mounts.has(grant.mountId) || this.inProgress.has(grant.mountId)) throw new BlocksnapError('E_BUSY', `mount ${grant.mountId} exists`);
    if (opts.pgPort !== undefined && (!Number.isInteger(opts.pgPort) || opts.pgPort < 1 || opts.pgPort > 65535)) throw new BlocksnapError('E_USAGE', `invalid port ${opts.pgPort}`);

    const target = path.resolve(opts.target ?? path.join(this.runBase, grant.mountId));
    const workDir = path.join(mountsDir(this.stateDir), `${grant.mountId}.d`);
    const runDir = path.join(this.runBase, `${grant.mountId}.run`);
    this.inProgress.add(grant.mountId);
    let journal: MountJournal | undefined;
    try {
      journal = await MountJournal.create(this.stateDir, { mountId: grant.mountId, imageId: grant.imageId, target });
      const phases = { attach: 0, mount: 0, wal: 0, prepare: 0, start: 0, total: 0 };
      await journal.step({ kind: 'dir', path: workDir, recursive: true });
      await mkdir(workDir, { mode: 0o700 });
      const empty = await isEmptyDir(target);
      if (empty === false) throw new BlocksnapError('E_USAGE', `target ${target} is not empty`);
      if (empty === undefined) {
        await this.makeRunBase(path.dirname(target));
        await journal.step({ kind: 'dir', path: target });
        await mkdir(target, { mode: 0o755 });
      }

      const attacher = this.o.attacher ?? (await defaultAttacher());
      const roots: string[] = [];
      const unbarriered: string[] = [];
      for (const x of [...grant.exports].sort((a, b) => a.volume.localeCompare(b.volume))) {
        const mp = grant.exports.length === 1 ? target : path.join(target, x.volume);
        if (mp !== target) {
          await journal.step({ kind: 'dir', path: mp });
          await mkdir(mp, { mode: 0o755 });
        }
        let t = performance.now();
        const tlsCertificates = await this.tlsCertificates(x.uri, workDir);
        const device = await attacher.attach(x.uri, { workDir, name: x.volume, readOnly: !grant.writable, ...(tlsCertificates ? { tlsCertificates } : {}) }, journal);
        phases.attach += (performance.now() - t) / 1000;
        t = performance.now();
        const type = await this.mountFs(journal, device, mp, grant.writable);
        if (grant.writable && (this.o.deferFlush ?? true) && (type === 'ext4' || type === 'ext3')) unbarriered.push(mp);
        phases.mount += (performance.now() - t) / 1000;
        roots.push(mp);
      }

      let t = performance.now();
      const dataDir = await findDataDir(roots);
      // A pg_wal link (initdb --waldir) names the source's WAL directory: re-pointed into the mounted set before anything is written.
      await pointWalLinkIntoCopy(dataDir, roots);
      const st = await stat(dataDir);
      const owner = await ownerOf(st.uid, st.gid);
      const port = opts.pgPort ?? (await freePort());
      const serverVersion = info?.serverVersion ?? (await versionOf(dataDir));
      const promoteHere = !!info && !opts.asStandby && pgSqlFor(serverVersion).recovery.promoteAtTarget !== null;
      let reprepare: ((port: number) => Promise<unknown>) | null = null;
      const extra: Record<string, string> = {};
      if (info && pgx) {
        const prep: PrepareOptions = {
          labelFile: info.labelFile, spcmapFile: null, stopLsn: info.stopLsn, timeline: info.timeline || null, version: info.serverVersion,
          asStandby: opts.asStandby,
          // A standby of the image has no primary to follow: it replays to the image's stop point and serves reads.
          restoreCommand: opts.asStandby ? '/bin/false' : undefined,
          port,
          // Fast promotion (see defaultPgSettings): pause at the stop point, promote from here.
          pauseAtTarget: promoteHere,
        };
        await checkDataDir(dataDir, prep);
        await this.copyWal(grant.imageId, pgx, wal, dataDir, owner);
        phases.wal = (performance.now() - t) / 1000;
        t = performance.now();
        await prepareDataDir(dataDir, prep);
        reprepare = (p) => prepareDataDir(dataDir, { ...prep, port: p });
      } else {
        await prepareCrashConsistent(dataDir);
        // Not written into the copy (no prepare ran): on the command line. archive_mode off: the copy must
        // not archive into the source's archive.
        extra.archive_mode = 'off';
      }
      await this.makeRunBase(this.runBase);
      await journal.step({ kind: 'dir', path: runDir, recursive: true });
      await mkdir(runDir, { mode: 0o755 });
      await chown(runDir, owner.uid, owner.gid);
      for (const mp of unbarriered) await barrierOn(mp);
      phases.prepare = (performance.now() - t) / 1000;

      t = performance.now();
      const binDir = this.o.binDirFor?.(serverVersion) ?? `/usr/lib/postgresql/${majorOf(serverVersion)}/bin`;
      const start: StartPgOptions = {
        dataDir, binDir, port, runDir, logFile: path.join(runDir, 'postgres.log'), owner,
        settings: { ...defaultPgSettings(serverVersion), ...extra, ...this.o.pgSettings },
      };
      const wait = { serverVersion, standby: !!opts.asStandby, promoteWhenPaused: promoteHere, timeoutMs: this.o.startTimeoutMs ?? 300_000 };
      const pgPort = await this.startPg(journal, start, wait, opts.pgPort === undefined ? reprepare ?? (async () => undefined) : null);
      phases.start = (performance.now() - t) / 1000;
      const secondsToFirstQuery = since();
      phases.total = secondsToFirstQuery;
      const connection = `host=${runDir} port=${pgPort} user=${owner.user} dbname=postgres`;
      await journal.update({ ready: true, dataDir, pgPort, connection, secondsToFirstQuery, phases });
      this.mounts.set(grant.mountId, journal);
      this.o.log?.info({ mountId: grant.mountId, imageId: grant.imageId, dataDir, pgPort, phases }, 'mount: PostgreSQL answers');
      return { mountId: grant.mountId, imageId: grant.imageId, target, dataDir, pgPort, connection, secondsToFirstQuery, phases };
    } catch (e) {
      const err = toBlocksnapError(e);
      if (journal) {
        try {
          await releaseSteps(journal.state.steps, this.logStep(grant.mountId));
          await journal.remove();
        } catch (rel) {
          // Left for cleanupOrphans (the state file stays); the mount's own failure is what the caller sees.
          this.o.log?.error({ err: rel, mountId: grant.mountId }, 'mount: releasing after a failure did not finish');
        }
      }
      throw err;
    } finally {
      this.inProgress.delete(grant.mountId);
    }
  }

  /** A parent of targets and socket dirs: created 0711 (PostgreSQL, running as the data directory's owner, must traverse it; nobody may list it). */
  private async makeRunBase(dir: string): Promise<void> {
    const created = await mkdir(dir, { recursive: true, mode: 0o711 });
    if (created !== undefined) await chmod(dir, 0o711);
  }

  private async mountFs(journal: MountJournal, device: string, mp: string, writable: boolean): Promise<string> {
    const type = await fsType(device);
    if (!type) throw new BlocksnapError('E_DEVICE', `no filesystem found on ${device}`);
    await journal.step({ kind: 'fs', target: mp, device });
    const r = await execa('mount', ['-t', type, '-o', mountOptions(type, writable, this.o.deferFlush ?? true).join(','), device, mp], { reject: false, stdin: 'ignore', timeout: 120_000 });
    if (r.exitCode !== 0) throw new BlocksnapError('E_DEVICE', `mount ${device} on ${mp} failed: ${String(r.stderr).trim()}`, { cause: r });
    return type;
  }

  /** The image's WAL into the data dir's WAL directory, each segment complete under a temp name first (no fsync: the start's sync covers it). */
  private async copyWal(imageId: string, x: MountGrantExport, wal: WalSource, dataDir: string, owner: { uid: number; gid: number }): Promise<void> {
    const walDir = path.join(dataDir, pgSqlFor(x.pg!.serverVersion).walDir);
    for (const name of x.pg!.wal) {
      if (!/^[0-9A-F]{24}$/.test(name)) throw new BlocksnapError('E_FORMAT', `not a WAL segment name: ${JSON.stringify(name)}`);
      const bytes = await wal(x.imageId || imageId, name);
      const tmp = path.join(walDir, `.${name}.blocksnap.tmp`);
      await writeSparse(tmp, bytes);
      await chown(tmp, owner.uid, owner.gid);
      await rename(tmp, path.join(walDir, name));
    }
  }

  /** Starts the copy; on a port taken between freePort and bind (only when we chose it) retries on another. */
  private async startPg(journal: MountJournal, o: StartPgOptions, wait: WaitOptions, reprepare: ((port: number) => Promise<unknown>) | null): Promise<number> {
    for (let attempt = 1; ; attempt++) {
      const pm = await startPostmaster(o, journal);
      try {
        await waitFirstAnswer(o, pm, wait);
        return o.port;
      } catch (e) {
        if (!reprepare || attempt >= 3 || pm.exited() === undefined || !(await portWasTaken(o.logFile))) throw e;
        o.port = await freePort();
        await reprepare(o.port);
      }
    }
  }

  async unmount(mountId: string): Promise<void> {
    const journal = this.mounts.get(mountId);
    if (!journal) throw new BlocksnapError('E_NOT_FOUND', `no mount ${mountId}`);
    await releaseSteps(journal.state.steps, this.logStep(mountId));
    await journal.remove();
    this.mounts.delete(mountId);
  }

  private logStep(mountId: string) {
    return (step: MountStep, outcome: string) => this.o.log?.info({ mountId, step, outcome }, 'mount: step released');
  }

  async list(): Promise<NbdLocalMount[]> {
    return [...this.mounts.values()].map(({ state: s }) => ({
      mountId: s.mountId, imageId: s.imageId, target: s.target, dataDir: s.dataDir!, pgPort: s.pgPort!, connection: s.connection!,
      secondsToFirstQuery: s.secondsToFirstQuery!, phases: s.phases as MountPhases,
    }));
  }

  /**
   * Releases the mounts a dead holder left in this state directory: state
   * files written for this very directory, not held by this mounter, whose
   * owner process (pid + start time, same boot) is gone.
   */
  async cleanupOrphans(): Promise<string[]> {
    const done: string[] = [];
    for (const { file, state } of await readMountStates(this.stateDir)) {
      if (!this.isOrphanCandidate(state)) continue;
      if (state.owner.pid !== process.pid && (await ownerAlive(state.owner))) continue;
      const j = MountJournal.adopt(file, state);
      await releaseSteps(state.steps, this.logStep(state.mountId));
      await j.remove();
      this.o.log?.info({ mountId: state.mountId, steps: state.steps.length }, 'mount: released an orphaned mount');
      done.push(state.mountId);
    }
    return done;
  }

  private isOrphanCandidate(s: MountState): boolean {
    return path.resolve(s.stateDir) === this.stateDir && !this.mounts.has(s.mountId) && !this.inProgress.has(s.mountId);
  }
}
