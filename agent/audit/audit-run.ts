import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { BlocksnapError } from '../../proto/errors.js';
import { FileBlockDevice } from '../blockdev/file-block-device.js';
import { capture } from '../capture.js';
import { TrackerAudit } from './tracker-audit.js';
import { readSnapshot } from '../transfer/snapshot-reader.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from '../snapshot/snapshot-provider.js';
import { DigestMap, digestMapPath } from '../state/digest-map.js';
import type { SwitchResult, VolumeTracking } from '../cbt/volume-tracking.js';

/**
 * A standalone tracker audit (`blocksnap-agent audit VOLUME`, issue 3 item 6):
 * one snapshot, the tracker's closed bitmap for it, and the true change found
 * by reading every chunk and comparing it with the local digest map of the
 * last committed image. Missed = changed but not marked (must be 0); extra =
 * marked but unchanged (allowed).
 *
 * No image is committed, so the closed generation is absorbed back into the
 * open one: the next incremental still covers everything since the basis.
 * A tracker caught missing chunks is invalidated first, so that next job
 * compares digests instead of trusting a bitmap proven wrong.
 *
 * PostgreSQL is NOT quiesced: the tracker's guarantee rests on the freeze
 * alone (DESIGN.md §7.2, A1), not on the database; no image is made, so
 * consistency buys nothing, while a backup start would force a checkpoint
 * (on ≤ 9.5 an exclusive backup) and a standby would pause replay — load on
 * production for an operator's diagnostic.
 */
export interface AuditOptions {
  volume: VolumeSpec;
  stateDir: string;
  provider: SnapshotProvider;
  tracking?: VolumeTracking;
  workers: number;
  log: Logger;
  signal?: AbortSignal;
}

export interface AuditPassedOrFailed {
  volume: string;
  valid: true;
  basisImageId: string;
  /** Chunks whose content differs from the basis (full comparison). */
  changed: number;
  /** Chunks the tracker marked. */
  tracked: number;
  missed: number;
  extra: number;
  /** First MISSED_SAMPLE (20) missed chunk indexes. */
  missedSample: number[];
  chunksTotal: number;
  chunksRead: number;
  bytesRead: number;
  freezeSeconds: number;
  seconds: number;
}

export interface AuditNotPossible {
  volume: string;
  valid: false;
  /** Why the tracker's bitmap could not be checked (the tracker knows it does not know). */
  reason: string;
  basisImageId: string;
  seconds: number;
}

export type AuditResult = AuditPassedOrFailed | AuditNotPossible;

export async function runAudit(o: AuditOptions): Promise<AuditResult> {
  const started = performance.now();
  const tag = `audit-${Date.now()}-${randomBytes(4).toString('hex')}`;
  const log = o.log.child({ volume: o.volume.name, audit: tag });
  const seconds = () => (performance.now() - started) / 1000;
  const map = await DigestMap.readIfValid(digestMapPath(o.stateDir, o.volume.name));
  if (!map) throw new BlocksnapError('E_NOT_FOUND', `volume ${o.volume.name}: no committed image to compare against (run a backup first)`);
  const notPossible = (reason: string): AuditNotPossible => {
    const r: AuditNotPossible = { volume: o.volume.name, valid: false, reason, basisImageId: map.imageId, seconds: seconds() };
    log.warn(r, 'audit not possible');
    return r;
  };
  const t = o.tracking;
  // Answers known before any snapshot: production is not frozen for them.
  if (!t) return notPossible('volume is not tracked');
  const before = t.validity();
  if (!before.valid) return notPossible(`tracker: ${before.reason}`);
  if (t.basisImageId !== map.imageId) return notPossible(basisMismatch(t.basisImageId, map.imageId));
  if (map.chunkSize !== o.volume.chunkSize) return notPossible(`chunk size changed since the last image: ${map.chunkSize} → ${o.volume.chunkSize}`);

  let snapshot: Snapshot | null = null;
  let switched: SwitchResult | null = null;
  let missed = 0;
  try {
    // No quiescer: see above.
    const cap = await capture({ jobId: tag, volume: o.volume, provider: o.provider, tracking: t, log });
    snapshot = cap.snapshot;
    switched = cap.switched;
    if (!switched) return notPossible('tracker switch failed');
    if (!switched.closed.validity.valid) return notPossible(`tracker: ${switched.closed.validity.reason}`);
    if (switched.basisImageId !== map.imageId) return notPossible(basisMismatch(switched.basisImageId, map.imageId));
    const dev = await FileBlockDevice.open(snapshot.path);
    const volumeSize = dev.size;
    await dev.close();
    if (volumeSize !== map.volumeSize) return notPossible(`volume size changed since the last image: ${map.volumeSize} → ${volumeSize}`);

    // Compression is wasted here (nothing is sent): the fastest level.
    const stream = await readSnapshot(
      { path: snapshot.path, volumeSize, chunkSize: map.chunkSize, startIndex: 0, mode: 'incremental', basisDigests: map.bytes(), compressionLevel: -7 },
      { workers: o.workers, signal: o.signal },
    );
    const tally = new TrackerAudit(switched.closed.bitmap.words, switched.closed.bitmap.count());
    for await (const c of stream) tally.changedChunk(c.index);
    const st = stream.stats();
    const tallied = tally.result();
    missed = tallied.missed;
    const r: AuditPassedOrFailed = {
      volume: o.volume.name, valid: true, basisImageId: map.imageId, ...tallied,
      chunksTotal: map.chunkCount, chunksRead: st.chunksRead, bytesRead: st.bytesRead,
      freezeSeconds: snapshot.freezeSeconds, seconds: seconds(),
    };
    if (missed > 0) log.error(r, 'AUDIT FAILED: the tracker missed changed chunks');
    else log.info(r, 'audit passed: 0 missed');
    return r;
  } finally {
    if (switched) await giveBack(t, switched, missed, log);
    if (snapshot) await o.provider.remove(snapshot).catch((e) => log.error({ err: e, snapshot: snapshot!.id }, 'snapshot removal failed'));
  }
}

/**
 * Absorbs the audit's closed generation back (as for a failed job). If that
 * fails, or the bitmap was just proven to miss writes, the open generation
 * is invalidated: a bitmap that may lack changes must never select chunks.
 */
async function giveBack(t: VolumeTracking, switched: SwitchResult, missed: number, log: Logger): Promise<void> {
  if (missed > 0) t.tracker.invalidate(`an audit found ${missed} changed chunks the tracker did not mark`);
  try {
    await t.failed(switched);
  } catch (e) {
    log.error({ err: e }, 'cannot return the audit generation to the tracker; invalidating it');
    try {
      t.tracker.invalidate(`an audit could not return its generation: ${(e as Error).message}`);
    } catch (err) {
      log.error({ err }, 'cannot invalidate the tracker');
    }
  }
}

function basisMismatch(tracked: string | null, basis: string): string {
  return `tracker bitmap is relative to ${tracked ?? 'no image'}, the last committed image is ${basis}`;
}
