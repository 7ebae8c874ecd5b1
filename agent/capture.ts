import { realpath } from 'node:fs/promises';
import { sep } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError } from '../proto/errors.js';
import type { PostgresConfig } from './config.js';
import type { Quiescer, QuiescerFactory, UnquiesceResult } from './pg/quiescer.js';
import { captureWal, walFacts, type WalSegment } from './pg/wal-capture.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from './snapshot/snapshot-provider.js';
import { checkTrackerBinding } from './snapshot/volume-identity.js';
import type { SwitchResult, VolumeTracking } from './cbt/volume-tracking.js';

/**
 * The capture window of one job (DESIGN.md §8; a consistency group: §4.4,
 * every member at one instant inside the same quiesce), in this order:
 *   prove each volume's identity (E_IDENTITY, nothing held yet)
 *   → quiesce PostgreSQL (backup start on a primary, replay pause on a standby)
 *   → tracker prepareSwitch → freeze, clone, thaw → tracker completeSwitch
 *   → unquiesce (backup stop: label, LSNs) → on a primary, read the WAL up
 *   to the stop LSN.
 * Whatever fails, nothing stays held: the quiescer is closed (backup
 * stopped, replay resumed), a snapshot taken before the failure is removed
 * and a closed tracker generation is absorbed back.
 *
 * The quiescer comes from the caller (`quiescer`, a factory the agent
 * composes from its config): capture only knows the Quiescer port.
 */
export interface CaptureResult {
  snapshot: Snapshot;
  switched: SwitchResult | null;
  pg: { info: UnquiesceResult; wal: WalSegment[]; walSegmentSize: number } | null;
}

export interface CaptureOptions {
  jobId: string;
  volume: VolumeSpec;
  provider: SnapshotProvider;
  tracking?: VolumeTracking;
  /** Quiesces the database around the snapshot (one quiescer per window); absent: a crash-consistent snapshot. */
  quiescer?: QuiescerFactory;
  /**
   * The PostgreSQL server whose data the volumes hold: its data directory and
   * WAL must be on them, and a primary's WAL up to the backup stop is read
   * after unquiesce. Requires `quiescer`.
   */
  postgres?: PostgresConfig;
  log: Logger;
}

/** One member of a consistency group: its volume and its tracker, if tracked. */
export interface CaptureMember {
  volume: VolumeSpec;
  tracking?: VolumeTracking;
}

export interface GroupCaptureOptions extends Omit<CaptureOptions, 'volume' | 'tracking'> {
  members: CaptureMember[];
  /** The group's name, for messages ("" for a lone volume). */
  group?: string;
}

export interface GroupCaptureResult {
  /** Same order as the options' members. */
  members: Array<{ snapshot: Snapshot; switched: SwitchResult | null }>;
  pg: CaptureResult['pg'];
}

/** A lone volume: a group of one. */
export async function capture(o: CaptureOptions): Promise<CaptureResult> {
  const r = await captureGroup({ ...o, members: [{ volume: o.volume, tracking: o.tracking }] });
  return { snapshot: r.members[0]!.snapshot, switched: r.members[0]!.switched, pg: r.pg };
}

/**
 * The capture window of a consistency group (DESIGN.md §4.4, §8): one
 * quiesce, prepareSwitch on every tracked member, ONE snapshot of all
 * members at one instant (provider.createGroup), completeSwitch on each,
 * one unquiesce. A group of one uses `provider.create`.
 */
export async function captureGroup(o: GroupCaptureOptions): Promise<GroupCaptureResult> {
  const { log, members } = o;
  let quiescer: Quiescer | null = null;
  let facts: Awaited<ReturnType<typeof walFacts>> | null = null;
  let snapshots: Snapshot[] = [];
  const switched: Array<SwitchResult | null> = members.map(() => null);
  try {
    if (members.length > 1 && !o.provider.createGroup) {
      throw new BlocksnapError('E_CONFIG', `the ${o.provider.kind} snapshot provider cannot snapshot group ${o.group ?? ''} at one instant`);
    }
    // Before anything is held: each member's device, image and mountpoint are
    // one volume, and its tracker traces that device (DESIGN.md §7.3). A lie
    // here would back up another file or miss writes without any error.
    for (const m of members) {
      const identity = await o.provider.proveIdentity(m.volume);
      if (m.tracking) checkTrackerBinding(identity, m.tracking.tracker);
    }
    if (o.postgres) {
      // A database that would go unquiesced is a composition bug, not a crash-consistent image.
      if (!o.quiescer) throw new BlocksnapError('E_INTERNAL', 'a PostgreSQL server is configured but no quiescer was given to the capture');
      facts = await walFacts(connectionOf(o.postgres), o.postgres.dataDirectory);
      if (!facts.proven) log.warn({ dataDirectory: facts.dataDirectory }, 'the server (before 9.6) cannot report its pg_control: its data directory is not proven to be this one');
      await assertOnVolumes(facts.dataDirectory, facts.walDir, members.map((m) => m.volume), o.group);
    }
    if (o.quiescer) {
      quiescer = o.quiescer(log);
      const server = await quiescer.connect();
      const q = await quiescer.quiesce({ label: `blocksnap ${o.jobId}`, fast: o.postgres?.fast ?? true });
      log.info({ role: server.role, version: server.version, startLsn: q.startLsn, replayLsn: q.replayLsn, seconds: q.seconds }, 'PostgreSQL quiesced');
    }
    // prepareSwitch before the freeze, completeSwitch after the snapshot: a
    // write racing the snapshot lands in both generations (DESIGN.md §7.2).
    const prepared: VolumeTracking[] = [];
    try {
      for (const m of members) {
        if (!m.tracking) continue;
        await m.tracking.prepare();
        prepared.push(m.tracking);
      }
      snapshots = members.length === 1
        ? [await o.provider.create(members[0]!.volume, o.jobId)]
        : await o.provider.createGroup!(members.map((m) => m.volume), o.jobId);
    } catch (e) {
      for (const t of prepared) await t.abort().catch((err) => log.error({ err }, 'tracker abortSwitch failed'));
      throw e;
    }
    for (const [i, m] of members.entries()) {
      if (!m.tracking) continue;
      try {
        switched[i] = await m.tracking.complete();
      } catch (e) {
        // The job can still run by digest comparison; the tracker says why in its validity.
        log.error({ err: e, volume: m.volume.name }, 'tracker switch failed');
      }
    }
    let pg: CaptureResult['pg'] = null;
    if (quiescer) {
      const info = await quiescer.unquiesce();
      // A primary writes its backup-end record after the snapshot: the image needs that WAL.
      const wal = facts && info.role === 'primary' && info.stopLsn && info.startLsn
        ? await captureWal(facts, info.timeline ?? 1, info.startLsn, info.stopLsn)
        : [];
      pg = { info, wal, walSegmentSize: facts?.segmentSize ?? 0 };
      log.info({ stopLsn: info.stopLsn, timeline: info.timeline, pausedSeconds: info.pausedSeconds, backupSeconds: info.backupSeconds, walSegments: wal.length }, 'PostgreSQL released');
    }
    return { members: snapshots.map((snapshot, i) => ({ snapshot, switched: switched[i]! })), pg };
  } catch (e) {
    for (const snapshot of snapshots) await o.provider.remove(snapshot).catch((err) => log.error({ err }, 'snapshot removal failed'));
    for (const [i, sw] of switched.entries()) {
      if (sw) await members[i]!.tracking?.failed(sw).catch((err) => log.error({ err }, 'tracker absorb failed'));
    }
    throw e;
  } finally {
    if (quiescer) {
      const r = await quiescer.close().catch((err) => ({ released: [], failed: [String(err)] }));
      if (r.failed.length) log.error({ failed: r.failed }, 'could not release PostgreSQL; the watchdog and the next agent start will');
    }
  }
}

export function connectionOf(p: PostgresConfig) {
  return { host: p.host, port: p.port, user: p.user, password: p.password, database: p.database };
}

/**
 * The data directory and its WAL must each live on a snapshotted volume (a
 * member of the group), or the image set is not the database.
 */
async function assertOnVolumes(dataDir: string, walDir: string, volumes: VolumeSpec[], group?: string): Promise<void> {
  const mounts = await Promise.all(volumes.map(async (v) => ({ v, mnt: await realpath(v.mountpoint) })));
  for (const [what, p] of [['data directory', dataDir], ['WAL directory', walDir]] as const) {
    let real: string;
    try {
      real = await realpath(p);
    } catch (e) {
      throw new BlocksnapError('E_CONFIG', `PostgreSQL ${what} ${p} is not visible on this host`, { cause: e });
    }
    if (!mounts.some(({ mnt }) => real === mnt || real.startsWith(mnt + sep))) {
      const where = volumes.length === 1
        ? `volume ${volumes[0]!.name} (${mounts[0]!.mnt}); put it on the volume or back up a consistency group holding both`
        : `any volume of group ${group ?? ''} (${mounts.map(({ v, mnt }) => `${v.name}: ${mnt}`).join(', ')})`;
      throw new BlocksnapError('E_CONFIG', `PostgreSQL ${what} ${real} is not on ${where}`);
    }
  }
}
