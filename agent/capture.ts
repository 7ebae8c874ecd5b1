import { realpath } from 'node:fs/promises';
import { join, sep } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError } from '../proto/errors.js';
import type { PostgresConfig } from './config.js';
import { PgQuiescer, type UnquiesceResult } from './pg/quiescer.js';
import { captureWal, walFacts, type WalSegment } from './pg/wal-capture.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from './snapshot/snapshot-provider.js';
import type { SwitchResult, VolumeTracking } from './tracking/volume-tracking.js';

/**
 * The capture window of one job (DESIGN.md §8), in this order:
 *   quiesce PostgreSQL (backup start on a primary, replay pause on a standby)
 *   → tracker prepareSwitch → freeze, clone, thaw → tracker completeSwitch
 *   → unquiesce (backup stop: label, LSNs) → on a primary, read the WAL up
 *   to the stop LSN.
 * Whatever fails, nothing stays held: the quiescer is closed (backup
 * stopped, replay resumed), a snapshot taken before the failure is removed
 * and a closed tracker generation is absorbed back.
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
  postgres?: PostgresConfig;
  stateDir: string;
  log: Logger;
}

export async function capture(o: CaptureOptions): Promise<CaptureResult> {
  const { log, tracking } = o;
  let quiescer: PgQuiescer | null = null;
  let facts: Awaited<ReturnType<typeof walFacts>> | null = null;
  let snapshot: Snapshot | null = null;
  let switched: SwitchResult | null = null;
  try {
    if (o.postgres) {
      const connection = connectionOf(o.postgres);
      facts = await walFacts(connection, o.postgres.dataDirectory);
      await assertOnVolume(facts.dataDirectory, facts.walDir, o.volume);
      quiescer = new PgQuiescer({
        connection, role: o.postgres.role, stateDir: join(o.stateDir, 'pg'), pauseTimeoutMs: o.postgres.pauseTimeoutMs,
        watchdogSeconds: o.postgres.watchdogSeconds, logger: log,
      });
      const server = await quiescer.connect();
      const q = await quiescer.quiesce({ label: `blocksnap ${o.jobId}`, fast: o.postgres.fast });
      log.info({ role: server.role, version: server.version, startLsn: q.startLsn, replayLsn: q.replayLsn, seconds: q.seconds }, 'PostgreSQL quiesced');
    }
    // prepareSwitch before the freeze, completeSwitch after the snapshot: a
    // write racing the snapshot lands in both generations (DESIGN.md §7.2).
    if (tracking) await tracking.prepare();
    try {
      snapshot = await o.provider.create(o.volume, o.jobId);
    } catch (e) {
      if (tracking) await tracking.abort().catch((err) => log.error({ err }, 'tracker abortSwitch failed'));
      throw e;
    }
    if (tracking) {
      try {
        switched = await tracking.complete();
      } catch (e) {
        // The job can still run by digest comparison; the tracker says why in its validity.
        log.error({ err: e }, 'tracker switch failed');
      }
    }
    let pg: CaptureResult['pg'] = null;
    if (quiescer) {
      const info = await quiescer.unquiesce();
      // A primary writes its backup-end record after the snapshot: the image needs that WAL.
      const wal = info.role === 'primary' && info.stopLsn && info.startLsn
        ? await captureWal(facts!, info.timeline ?? 1, info.startLsn, info.stopLsn)
        : [];
      pg = { info, wal, walSegmentSize: facts!.segmentSize };
      log.info({ stopLsn: info.stopLsn, timeline: info.timeline, pausedSeconds: info.pausedSeconds, backupSeconds: info.backupSeconds, walSegments: wal.length }, 'PostgreSQL released');
    }
    return { snapshot, switched, pg };
  } catch (e) {
    if (snapshot) await o.provider.remove(snapshot).catch((err) => log.error({ err }, 'snapshot removal failed'));
    if (switched) await tracking?.failed(switched).catch((err) => log.error({ err }, 'tracker absorb failed'));
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

/** The data directory and its WAL must live on the snapshotted volume, or the image is not the database. */
async function assertOnVolume(dataDir: string, walDir: string, volume: VolumeSpec): Promise<void> {
  const mnt = await realpath(volume.mountpoint);
  for (const [what, p] of [['data directory', dataDir], ['WAL directory', walDir]] as const) {
    let real: string;
    try {
      real = await realpath(p);
    } catch (e) {
      throw new BlocksnapError('E_CONFIG', `PostgreSQL ${what} ${p} is not visible on this host`, { cause: e });
    }
    if (real !== mnt && !real.startsWith(mnt + sep)) {
      throw new BlocksnapError('E_CONFIG', `PostgreSQL ${what} ${real} is not on volume ${volume.name} (${mnt}); consistency groups across volumes are not supported yet`);
    }
  }
}
