import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import { DIGEST_BYTES, imageRootDigest } from '../../proto/shared/image-root.js';
import { RESTORE_BATCH_BYTES, RESTORE_MAX_RANGES, RESTORE_WINDOW_BYTES } from '../../proto/shared/restore-protocol.js';
import type { VolumeTracking } from '../cbt/volume-tracking.js';
import { readChunks } from '../reader/chunk-reader.js';
import { DigestMap, digestMapPath } from '../state/digest-map.js';
import { digestDiffSet, emptySet, indexesOf, setOfWords, unionOf, type ChunkSet } from './changed-set.js';
import { ChunkWriter } from './chunk-writer.js';
import { RestoreSession, type RestoreImageMap } from './restore-session.js';
import { openTarget, type ConfiguredVolume, type OpenTarget } from './restore-target.js';
import { zeroRanges } from './zero-ranges.js';

/**
 * One restore of an image onto a device or file (DESIGN.md §4.6, issue 9
 * items 6 and 7), run by the agent over its appliance session:
 * map → target checks → what to write → holes and wanted chunks → done.
 *
 * Full: every non-ZERO chunk is fetched; ZERO chunks become holes (nothing
 * to do on a new file). Changed-only: only the chunks whose content differs
 * between the image and the target now. On a configured volume's own device
 * that set comes from its change tracker when it is provably complete — the
 * open generation is valid and relative to the image B of the agent's digest
 * map, so it holds every chunk changed since B; for another image I the
 * chunks whose digests differ between I and B are added (set union with
 * `bitset`). Anything else reads and hashes the target (digest compare).
 */
export interface RestoreRequestOptions {
  imageId: string;
  target: string;
  changedOnly: boolean;
  force: boolean;
}

export interface RestoreProgress {
  phase: 'map' | 'compare' | 'write';
  chunksDone: number;
  chunksTotal: number;
  bytesWritten: number;
}

export interface RestoreResult {
  imageId: string;
  volume: string;
  target: string;
  targetKind: 'device' | 'file';
  changedOnly: boolean;
  /** full | tracker | digest-compare */
  changeSource: string;
  /** Why a changed-only restore compared digests instead of using the tracker. */
  fallbackReason: string;
  volumeSize: number;
  chunkSize: number;
  chunkCount: number;
  /** Non-ZERO chunks fetched from the appliance and written. */
  chunksFetched: number;
  /** Chunks left as they were because they already equal the image (changed-only). */
  chunksSkipped: number;
  /** Changed-only: chunks read and hashed to find those that differ (the tracker's candidates, or every chunk). */
  chunksCompared: number;
  /** ZERO chunks of the image made zero (holes/zeros; on a new file they are holes without a write). */
  holes: number;
  bytesWritten: number;
  /** Bytes made zero (holes or zeros). */
  bytesZeroed: number;
  seconds: number;
  /** Written chunk bytes per second, MB = 10^6 bytes. */
  mbPerSecond: number;
}

export interface RestoreContext {
  volumes: readonly ConfiguredVolume[];
  stateDir: string;
  workers: number;
  log: Logger;
  trackingOf(volume: string): VolumeTracking | undefined;
  /** Holds a configured volume for the restore (E_BUSY if a job or audit has it); returns the release. */
  hold(volume: string): () => void;
  /** Opens the wire exchange: the session is registered for delivery before the request is sent. */
  openSession(requestId: string): RestoreSession;
  closeSession(requestId: string): void;
  signal?: AbortSignal;
  onProgress?(p: RestoreProgress): void;
}

const MAP_TIMEOUT_MS = 120_000;
const BATCH_TIMEOUT_MS = 120_000;
/**
 * Batches handed to the workers at once (each ≤ ~2 MiB): as many as the
 * appliance's window lets arrive, so a batch goes to a worker as soon as it
 * is received. With 4, the others waited here long enough to outlive
 * young-generation GCs: their 2 MiB messages, retained in the old
 * generation, made V8 run a full mark-compact every ~64 MiB restored
 * (more CPU than the hashing). The window still bounds what is in flight.
 */
const WRITES_IN_FLIGHT = Math.ceil(RESTORE_WINDOW_BYTES / RESTORE_BATCH_BYTES) + 1;
/** Write progress events at most this often. */
const PROGRESS_MS = 100;

export const newRestoreId = () => 'rst-' + randomBytes(8).toString('hex');

export async function runRestore(req: RestoreRequestOptions, ctx: RestoreContext): Promise<RestoreResult> {
  const started = performance.now();
  const requestId = newRestoreId();
  const log = ctx.log.child({ restore: requestId, image: req.imageId, target: req.target });
  const session = ctx.openSession(requestId);
  let target: OpenTarget | null = null;
  let release: (() => void) | null = null;
  let touched = false;
  let writer: ChunkWriter | null = null;
  let inFlight = new Set<Promise<void>>();
  const onAbort = () => session.fail(new BlocksnapError('E_CANCELLED', 'restore cancelled', { cause: ctx.signal?.reason }));
  ctx.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    if (ctx.signal?.aborted) onAbort();
    ctx.onProgress?.({ phase: 'map', chunksDone: 0, chunksTotal: 0, bytesWritten: 0 });
    await session.request(req.imageId, req.changedOnly);
    const map = await withTimeout(session.imageMap(), MAP_TIMEOUT_MS, 'the image map');
    target = await openTarget({ path: req.target, force: req.force, changedOnly: req.changedOnly }, map.volumeSize, ctx.volumes, map.volume);
    if (target.volume) release = ctx.hold(target.volume.name);
    const n = map.chunkCount;
    const nonZero = nonZeroSet(map);
    let changeSource = 'full';
    let fallbackReason = '';
    let considered: ChunkSet | null = null; // null: every chunk
    let chunksCompared = 0;
    if (req.changedOnly) {
      const c = await changedChunks(map, target, ctx, log);
      considered = c.set;
      changeSource = c.source;
      fallbackReason = c.reason;
      chunksCompared = c.candidates;
    }
    const need = considered ? considered.and(nonZero) : nonZero;
    const needCount = need.cardinality();
    const zeroCount = (considered ? considered.cardinality() : n) - needCount;
    const chunksSkipped = considered ? n - considered.cardinality() : 0;
    log.info({ changeSource, fallbackReason, need: needCount, zero: zeroCount, skipped: chunksSkipped }, 'restore plan');

    // Wanted ranges first (the appliance starts streaming), holes meanwhile.
    const ranges = [...rangesOf(indexesOf(need, n))];
    for (let i = 0; i < ranges.length || i === 0; i += RESTORE_MAX_RANGES) {
      await session.want(ranges.slice(i, i + RESTORE_MAX_RANGES), i + RESTORE_MAX_RANGES >= ranges.length);
    }
    const zeroSet = considered ? considered.andNot(nonZero) : nonZero.not();
    touched = true;
    const zeroing = zeroRanges(target, byteRanges(rangesOf(indexesOf(zeroSet, n)), map));
    zeroing.catch(() => undefined);

    // Decompress, SHA-256 and write in the reader's number of worker threads (1 at least).
    const w = new ChunkWriter(target.handle, map.volumeSize, map.chunkSize, map.digests, (i) => need.get(i) === 1, n, Math.max(1, ctx.workers));
    writer = w;
    let received = 0;
    let lastProgress = 0;
    inFlight = new Set<Promise<void>>();
    let writeError: BlocksnapError | null = null;
    while (received < needCount) {
      if (writeError) throw writeError;
      const batch = await withTimeout(session.nextBatch(), BATCH_TIMEOUT_MS, 'the next chunks');
      received += batch.chunks.length;
      if (received > needCount) throw new BlocksnapError('E_PROTOCOL', `the appliance sent more chunks than asked for (${received} > ${needCount})`);
      const p: Promise<void> = w.write(batch)
        .then(() => session.ack(batch.seq))
        .then(() => {
          // At most every PROGRESS_MS (and the last batch): an event per ~2 MiB batch cost the agent's
          // main thread more than the acks (a JSON line to the control socket each).
          const now = performance.now();
          if (now - lastProgress < PROGRESS_MS && w.written < needCount) return;
          lastProgress = now;
          ctx.onProgress?.({ phase: 'write', chunksDone: w.written, chunksTotal: needCount, bytesWritten: w.bytesWritten });
        })
        .catch((e) => {
          writeError ??= toBlocksnapError(e, 'E_DEVICE');
          session.fail(writeError);
        })
        .finally(() => inFlight.delete(p));
      inFlight.add(p);
      if (inFlight.size >= WRITES_IN_FLIGHT) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    await w.close();
    if (writeError) throw writeError;
    const bytesZeroed = await zeroing;
    await target.commit();
    await session.end(true).catch(() => undefined);
    const seconds = (performance.now() - started) / 1000;
    const result: RestoreResult = {
      imageId: map.imageId, volume: map.volume, target: req.target, targetKind: target.kind, changedOnly: req.changedOnly,
      changeSource, fallbackReason, volumeSize: map.volumeSize, chunkSize: map.chunkSize, chunkCount: n,
      chunksFetched: w.written, chunksSkipped, chunksCompared, holes: zeroCount, bytesWritten: w.bytesWritten, bytesZeroed,
      seconds, mbPerSecond: w.bytesWritten / 1e6 / Math.max(seconds, 1e-9),
    };
    log.info(result, 'restore done');
    return result;
  } catch (e) {
    const cause = toBlocksnapError(e);
    session.fail(cause);
    await session.end(false, cause.code, cause.message).catch(() => undefined);
    // No worker may still write into the target while it is abandoned (a temp file is removed).
    await Promise.allSettled(inFlight);
    await writer?.close().catch(() => undefined);
    const state = target ? await target.abandon(touched).catch((x) => `state unknown: ${(x as Error).message}`) : `${req.target} was not touched`;
    log.warn({ code: cause.code, message: cause.message, state }, 'restore failed');
    throw new BlocksnapError(cause.code, `restore of ${req.imageId} onto ${req.target} failed: ${cause.message}; ${state}`, { cause: e });
  } finally {
    ctx.signal?.removeEventListener('abort', onAbort);
    release?.();
    ctx.closeSession(requestId);
  }
}

/**
 * The chunks that differ between the image and the target now. The tracker
 * path needs, on the volume's own device: a live tracker whose open
 * generation is valid, relative to the basis B of the local digest map, of
 * the image's geometry; then tracker ∪ (digests of I ≠ digests of B). When
 * I = B the local map must hash to the image's root (a cross-check of what
 * the appliance sent). Otherwise: read and hash the target.
 */
async function changedChunks(
  map: RestoreImageMap, target: OpenTarget, ctx: RestoreContext, log: Logger,
): Promise<{ set: ChunkSet; source: string; reason: string; candidates: number }> {
  let reason = 'the target is not a configured volume';
  if (target.volume) {
    const v = target.volume;
    const t = ctx.trackingOf(v.name);
    const local = await DigestMap.readIfValid(digestMapPath(ctx.stateDir, v.name));
    if (!t) reason = `volume ${v.name} is not tracked`;
    else if (!local) reason = `volume ${v.name} has no valid digest map of its last image`;
    else if (t.basisImageId !== local.imageId) reason = `the tracker is relative to ${t.basisImageId ?? 'no image'}, the digest map to ${local.imageId}`;
    else if (local.volumeSize !== map.volumeSize || local.chunkSize !== map.chunkSize) reason = `the volume's geometry (${local.volumeSize}/${local.chunkSize}) is not the image's (${map.volumeSize}/${map.chunkSize})`;
    else {
      // Drains the trace: every write queued before now is in the bitmap.
      const cp = await t.tracker.checkpoint();
      if (!cp.validity.valid) reason = `tracker invalid: ${cp.validity.reason}`;
      else if (cp.bitmap.chunkCount !== map.chunkCount) reason = 'the tracker bitmap has another chunk count';
      else if (local.imageId === map.imageId && !imageRootDigest(map.volumeSize, map.chunkSize, local.bytes()).equals(map.rootDigest)) {
        reason = `the local digest map of ${local.imageId} does not hash to the image's root`;
      } else {
        const tracked = setOfWords(cp.bitmap.words);
        const candidates = local.imageId === map.imageId ? tracked : unionOf(tracked, digestDiffSet(map.digests, local.bytes(), map.chunkCount));
        // The candidates are a superset (a chunk written back with the same bytes, filesystem
        // metadata rewritten): reading and hashing just those is cheaper than writing them, and
        // leaves exactly the chunks that differ.
        const set = await differingChunks(map, target, ctx, candidates);
        log.info({ tracked: tracked.cardinality(), candidates: candidates.cardinality(), differing: set.cardinality(), basis: local.imageId }, 'changed chunks from the tracker');
        return { set, source: 'tracker', reason: '', candidates: candidates.cardinality() };
      }
    }
  }
  log.info({ reason }, 'changed-only restore compares digests');
  return { set: await differingChunks(map, target, ctx, null), source: 'digest-compare', reason, candidates: map.chunkCount };
}

/** Of `candidates` (null: every chunk), those whose bytes on the target differ from the image: read and hashed by the reader workers. */
async function differingChunks(map: RestoreImageMap, target: OpenTarget, ctx: RestoreContext, candidates: ChunkSet | null): Promise<ChunkSet> {
  const n = map.chunkCount;
  ctx.onProgress?.({ phase: 'compare', chunksDone: 0, chunksTotal: candidates ? candidates.cardinality() : n, bytesWritten: 0 });
  const set = emptySet(n);
  if (candidates?.isEmpty()) return set;
  const select = candidates ? Uint32Array.from(candidates.data.slice(0, Math.ceil(n / 32)), (w) => w >>> 0) : undefined;
  const stream = readChunks(
    { path: target.path, volumeSize: map.volumeSize, chunkSize: map.chunkSize, startIndex: 0, basisDigests: map.digests, mode: 'incremental', select },
    { workers: ctx.workers, signal: ctx.signal },
  );
  for await (const c of stream) set.set(c.index, 1);
  return set;
}

function nonZeroSet(map: RestoreImageMap): ChunkSet {
  const s = emptySet(map.chunkCount);
  const d = map.digests;
  for (let i = 0; i < map.chunkCount; i++) {
    const off = i * DIGEST_BYTES;
    // Fast path: most digests have a non-zero first word.
    if (d.readUInt32LE(off) !== 0 || !isZero(d, off)) s.set(i, 1);
  }
  return s;
}

function isZero(d: Buffer, off: number): boolean {
  for (let k = off; k < off + DIGEST_BYTES; k += 4) if (d.readUInt32LE(k) !== 0) return false;
  return true;
}

function* rangesOf(indexes: Iterable<number>): Generator<{ first: number; count: number }> {
  let first = -1;
  let count = 0;
  for (const i of indexes) {
    if (first >= 0 && i === first + count) {
      count++;
      continue;
    }
    if (first >= 0) yield { first, count };
    first = i;
    count = 1;
  }
  if (first >= 0) yield { first, count };
}

function* byteRanges(ranges: Iterable<{ first: number; count: number }>, map: RestoreImageMap): Generator<{ offset: number; length: number }> {
  for (const r of ranges) {
    const offset = r.first * map.chunkSize;
    yield { offset, length: Math.min(map.volumeSize, (r.first + r.count) * map.chunkSize) - offset };
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new BlocksnapError('E_TIMEOUT', `no answer from the appliance for ${ms / 1000} s while waiting for ${what}`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
