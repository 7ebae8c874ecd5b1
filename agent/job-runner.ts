import { join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError, isBlocksnapError, toBlocksnapError } from '../proto/errors.js';
import {
  emptyTransferStats, envelope, JobMode, type Chunk, type Committed, type Envelope, type EnvelopeKind, type MessageMap,
  type RunJob, type TransferStats, type VolumeReady,
} from '../proto/messages.js';
import { FileBlockDevice } from './blockdev/file-block-device.js';
import { readChunks } from './reader/chunk-reader.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from './snapshot/snapshot-provider.js';
import { DigestMap } from './state/digest-map.js';
import { FlowWindow } from './flow-window.js';
import { capture, type CaptureResult } from './capture.js';
import type { PostgresConfig } from './config.js';
import { zstdCompress } from '../proto/zstd.js';
import { createHash } from 'node:crypto';
import { dataRanges, holeChunks } from './blockdev/allocation-map.js';
import type { SwitchResult, VolumeTracking } from './tracking/volume-tracking.js';

export interface RunnerDeps {
  stateDir: string;
  provider: SnapshotProvider;
  log: Logger;
  windowBytes: number;
  batchBytes: number;
  workers: number;
  /** Sends on the current connection; rejects E_DISCONNECTED when there is none. */
  send(env: Envelope): Promise<void>;
  /** Resolves when a (new) session is up; rejects after the timeout. */
  waitConnected(timeoutMs: number): Promise<void>;
  resumeTimeoutMs: number;
  replyTimeoutMs: number;
  /** Changed-block tracking of the job's volume, if it is tracked. */
  tracking?: VolumeTracking;
  /** The PostgreSQL server to quiesce around the snapshot. */
  postgres?: PostgresConfig;
}

export function digestMapPath(stateDir: string, volume: string): string {
  return join(stateDir, 'volumes', `${volume}.digests`);
}

type Waiter = { kind: EnvelopeKind; resolve: (m: any) => void; reject: (e: BlocksnapError) => void; timer: NodeJS.Timeout };

/**
 * Runs one backup job on the agent (DESIGN.md §4.2): snapshot, begin, stream
 * chunks under the flow window, end, wait for the commit, then save the new
 * digest map and drop the snapshot. The snapshot is removed whatever
 * happens. A dropped connection is not a failure: the runner waits for the
 * agent to reconnect and resumes from the appliance's durable point.
 */
export class JobRunner {
  readonly jobId: string;
  private waiters: Waiter[] = [];
  /** An error that ends the job (appliance Error, cancel): not retryable. */
  private fatal: BlocksnapError | null = null;
  private readonly abort = new AbortController();
  private readonly window: FlowWindow;
  private stats: TransferStats = emptyTransferStats();
  /** What PostgreSQL's quiesce window returned, and the WAL to send. */
  private pg: CaptureResult['pg'] = null;
  /** The tracker generation closed at this job's snapshot. */
  private switched: SwitchResult | null = null;
  /** Set once the runner holds nothing of its volume any more (snapshot released). */
  released = false;
  private lastProgress = 0;
  /** Chunk indexes that really changed (audit only). */
  private emitted: Set<number> | null = null;

  constructor(
    private readonly deps: RunnerDeps,
    private readonly job: RunJob,
    private readonly volume: VolumeSpec,
  ) {
    this.jobId = job.jobId;
    this.window = new FlowWindow(deps.windowBytes);
  }

  get volumeName(): string {
    return this.volume.name;
  }

  /** Frames for this job from the connection. */
  deliver(env: Envelope): void {
    switch (env.kind) {
      case 'ack':
        this.window.ack(env.ack.seq);
        return;
      case 'error':
        return this.end(new BlocksnapError(codeOf(env.error.code), `appliance: ${env.error.message}`));
      case 'cancelJob':
        return this.end(new BlocksnapError('E_CANCELLED', `cancelled by the appliance: ${env.cancelJob.reason}`));
      default: {
        const i = this.waiters.findIndex((w) => w.kind === env.kind);
        if (i < 0) {
          this.deps.log.warn({ job: this.jobId, kind: env.kind }, 'unexpected frame for job');
          return;
        }
        const [w] = this.waiters.splice(i, 1);
        clearTimeout(w!.timer);
        w!.resolve((env as any)[env.kind]);
      }
    }
  }

  /** Ends the job from this side (agent stopping): the snapshot is released, the appliance told if reachable. */
  cancel(reason: string): void {
    this.end(new BlocksnapError('E_CANCELLED', reason));
  }

  /** The connection dropped: wake every waiter; the job itself goes on. */
  disconnected(): void {
    const err = new BlocksnapError('E_DISCONNECTED', 'connection to the appliance lost');
    this.window.fail(err);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
  }

  private end(err: BlocksnapError): void {
    this.fatal ??= err;
    this.abort.abort(err);
    this.window.fail(err);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
  }

  private expect<K extends EnvelopeKind>(kind: K, timeoutMs = this.deps.replyTimeoutMs): Promise<MessageMap[K]> {
    if (this.fatal) return Promise.reject(this.fatal);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w.timer !== timer);
        reject(new BlocksnapError('E_TIMEOUT', `no ${kind} from the appliance within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiters.push({ kind, resolve, reject, timer });
    });
  }

  /**
   * Runs to the end and reports the result to the appliance (best effort).
   * The snapshot is removed before the result is sent, so when the
   * appliance sees the job end, the agent holds nothing of it any more.
   */
  async run(): Promise<{ ok: boolean; imageId?: string; error?: BlocksnapError; stats: TransferStats }> {
    const log = this.deps.log.child({ job: this.jobId, volume: this.volume.name });
    let snapshot: Snapshot | null = null;
    let outcome: { ok: boolean; imageId?: string; error?: BlocksnapError; stats: TransferStats };
    try {
      const cap = await capture({
        jobId: this.jobId, volume: this.volume, provider: this.deps.provider, tracking: this.deps.tracking,
        postgres: this.deps.postgres, stateDir: this.deps.stateDir, log,
      });
      snapshot = cap.snapshot;
      this.switched = cap.switched;
      this.pg = cap.pg;
      this.stats.freezeSeconds = snapshot.freezeSeconds;
      this.stats.snapshotSeconds = snapshot.snapshotSeconds;
      log.info({ freezeSeconds: snapshot.freezeSeconds, snapshotSeconds: snapshot.snapshotSeconds }, 'snapshot taken');
      const committed = await this.transfer(snapshot, log);
      await this.deps.tracking?.committed(committed.imageId).catch((e) => log.error({ err: e }, 'cannot record the tracker basis'));
      this.stats = { ...this.stats, bytesStored: committed.stats?.bytesStored ?? 0, chunksStored: committed.stats?.chunksStored ?? 0 };
      log.info({ image: committed.imageId, ...this.stats }, 'job committed');
      outcome = { ok: true, imageId: committed.imageId, stats: this.stats };
    } catch (e) {
      const err = this.fatal ?? toBlocksnapError(e);
      log.warn({ code: err.code, message: err.message }, 'job failed');
      outcome = { ok: false, error: err, stats: this.stats };
      // Changes the failed job saw must count again for the next one.
      if (this.switched) await this.deps.tracking?.failed(this.switched).catch((e) => log.error({ err: e }, 'tracker absorb failed'));
    }
    this.abort.abort();
    if (snapshot) {
      await this.deps.provider.remove(snapshot).catch((e) => log.error({ err: e, snapshot: snapshot!.id }, 'snapshot removal failed'));
    }
    this.released = true;
    if (outcome.ok) {
      await this.report({ jobId: this.jobId, ok: true, imageId: outcome.imageId!, errorCode: '', errorMessage: '', stats: this.stats });
    } else if (!this.fatal || outcome.error!.code === 'E_CANCELLED') {
      // The appliance already knows about errors it sent us.
      const err = outcome.error!;
      await this.report({ jobId: this.jobId, ok: false, imageId: '', errorCode: err.code, errorMessage: err.message, stats: this.stats });
    }
    return outcome;
  }

  private async report(result: MessageMap['jobResult']): Promise<void> {
    await this.deps.send(envelope('jobResult', result)).catch((e) => this.deps.log.warn({ err: e, job: this.jobId }, 'could not report job result'));
  }

  private async transfer(snapshot: Snapshot, log: Logger): Promise<Committed> {
    const dev = await FileBlockDevice.open(snapshot.path);
    const volumeSize = dev.size;
    await dev.close();
    const chunkSize = this.volume.chunkSize;
    const mapFile = digestMapPath(this.deps.stateDir, this.volume.name);
    let basis: DigestMap | null = null;
    if (this.job.mode === JobMode.INCREMENTAL) {
      basis = await DigestMap.readIfValid(mapFile);
      if (basis && (basis.volumeSize !== volumeSize || basis.chunkSize !== chunkSize)) {
        this.stats.fallbackReason = 'volume geometry changed since the last image';
        basis = null;
      } else if (!basis) {
        this.stats.fallbackReason = 'no valid local digest map';
      }
    }
    const begin = {
      jobId: this.jobId, volume: this.volume.name, volumeSize, chunkSize, basisImageId: basis?.imageId ?? '',
      mode: basis ? JobMode.INCREMENTAL : JobMode.FULL, resume: false,
    };
    await this.deps.send(envelope('beginVolume', begin));
    let ready: VolumeReady = await this.expect('volumeReady');
    if (!ready.basisAccepted && basis) {
      this.stats.fallbackReason = `appliance refused the basis: ${ready.reason}`;
      basis = null;
    }
    const mode = basis ? 'incremental' : 'full';
    this.stats.changeSource = basis ? 'digest-compare' : 'full';
    const plan = this.selection(basis);
    const ranges = await dataRanges(snapshot.path).catch(() => null);
    const holes = ranges ? holeChunks(ranges, volumeSize, chunkSize) : undefined;
    log.info({ mode, basis: basis?.imageId, fallback: this.stats.fallbackReason || undefined }, 'transfer starting');
    const next = basis ? basis.copy() : DigestMap.create({ volumeSize, chunkSize, imageId: 'pending' });
    this.stats.chunksTotal = next.chunkCount;

    let seq = 0;
    for (;;) {
      try {
        seq = await this.stream(snapshot.path, volumeSize, chunkSize, mode, basis, next, ready.resumeFrom, seq, plan.select, holes);
        if (plan.audit) this.finishAudit(plan.audit);
        await this.sendPg();
        await this.deps.send(envelope('endVolume', { jobId: this.jobId, nextIndex: next.chunkCount, stats: this.stats }));
        const committed = await this.expect('committed', this.deps.replyTimeoutMs * 4);
        next.setImageId(committed.imageId);
        await next.write(mapFile);
        return committed;
      } catch (e) {
        if (this.fatal || !isBlocksnapError(e, 'E_DISCONNECTED')) throw e;
        log.warn('connection lost during transfer; waiting to resume');
        await this.deps.waitConnected(this.deps.resumeTimeoutMs);
        if (this.fatal) throw this.fatal;
        this.window.reset();
        await this.deps.send(envelope('beginVolume', { ...begin, resume: true }));
        ready = await this.expect('volumeReady');
        log.info({ resumeFrom: ready.resumeFrom, lastSeq: seq }, 'transfer resumed');
      }
    }
  }

  /** Reads from `from` and sends batches; returns the last seq used. */
  private async stream(
    path: string, volumeSize: number, chunkSize: number, mode: 'full' | 'incremental',
    basis: DigestMap | null, next: DigestMap, from: number, seq: number, select: Uint32Array | undefined, holes: Uint32Array | undefined,
  ): Promise<number> {
    const stream = readChunks(
      { path, volumeSize, chunkSize, startIndex: from, mode, basisDigests: basis ? basis.bytes() : undefined, select, holes },
      { workers: this.deps.workers, signal: this.abort.signal },
    );
    const started = performance.now();
    const base = { ...this.stats };
    let batch: Chunk[] = [];
    let batchBytes = 0;
    const flush = async () => {
      if (batch.length === 0) return;
      seq++;
      await this.window.reserve(seq, batchBytes);
      await this.deps.send(envelope('chunkBatch', { jobId: this.jobId, seq, chunks: batch }));
      batch = [];
      batchBytes = 0;
    };
    for await (const c of stream) {
      next.set(c.index, c.digest);
      this.emitted?.add(c.index);
      const data = c.data ?? EMPTY;
      batch.push({ index: c.index, digest: c.zero ? EMPTY : c.digest, zero: c.zero, data, plainLength: c.plainLength });
      batchBytes += data.length + 64;
      if (batchBytes >= this.deps.batchBytes) await flush();
      this.progress(c.index, stream.stats(), base);
    }
    await flush();
    const st = stream.stats();
    this.accumulate(st, base, performance.now() - started);
    return seq;
  }

  /** The quiesce window's result and the WAL a primary image needs (after the chunks, before EndVolume). */
  private async sendPg(): Promise<void> {
    const pg = this.pg;
    if (!pg) return;
    const i = pg.info;
    await this.deps.send(envelope('pgBackupInfo', {
      jobId: this.jobId, labelFile: i.labelFile ?? '', spcmapFile: i.spcmapFile ?? '', startLsn: i.startLsn ?? '',
      stopLsn: i.stopLsn ?? '', timeline: i.timeline ?? 0, replayLsn: i.replayLsn ?? '', exclusive: i.exclusive,
      serverVersion: i.version, role: i.role, pausedSeconds: i.pausedSeconds, backupSeconds: i.backupSeconds,
      walSegmentSize: pg.walSegmentSize,
    }));
    const PIECE = 4 << 20;
    for (const seg of pg.wal) {
      for (let off = 0; off < seg.data.length; off += PIECE) {
        const plain = seg.data.subarray(off, Math.min(seg.data.length, off + PIECE));
        await this.deps.send(envelope('walPiece', {
          jobId: this.jobId, fileName: seg.name, offset: off, data: zstdCompress(plain), plainLength: plain.length,
          digest: createHash('sha256').update(plain).digest(), fileSize: seg.data.length,
        }));
      }
    }
  }

  /**
   * Which chunks to read. With a valid tracker generation relative to the
   * same basis, only the marked chunks (changeSource 'tracker'); otherwise
   * all of them, compared by digest, with the reason recorded. An audit
   * reads all of them and afterwards proves the bitmap covered every change.
   */
  private selection(basis: DigestMap | null): { select?: Uint32Array; audit?: { bitmap: Uint32Array } } {
    const sw = this.switched;
    if (!basis) return {};
    if (!this.deps.tracking) {
      this.stats.fallbackReason ||= 'volume is not tracked';
      return {};
    }
    if (!sw) {
      this.stats.fallbackReason ||= 'tracker switch failed';
      return {};
    }
    this.stats.trackedChunks = sw.closed.bitmap.count();
    if (!sw.closed.validity.valid) {
      this.stats.fallbackReason = `tracker: ${sw.closed.validity.reason}`;
      return {};
    }
    if (sw.basisImageId !== basis.imageId) {
      this.stats.fallbackReason = `tracker bitmap is relative to ${sw.basisImageId ?? 'no image'}, basis is ${basis.imageId}`;
      return {};
    }
    if (this.job.audit) {
      this.emitted = new Set();
      this.stats.changeSource = 'digest-compare (audit)';
      return { audit: { bitmap: sw.closed.bitmap.words } };
    }
    this.stats.changeSource = 'tracker';
    return { select: sw.closed.bitmap.words };
  }

  private finishAudit(audit: { bitmap: Uint32Array }): void {
    const marked = (i: number) => ((audit.bitmap[i >>> 5]! >>> (i & 31)) & 1) === 1;
    let missed = 0;
    const missedSample: number[] = [];
    for (const i of this.emitted!) {
      if (!marked(i)) {
        missed++;
        if (missedSample.length < 20) missedSample.push(i);
      }
    }
    this.stats.audited = true;
    this.stats.auditChanged = this.emitted!.size;
    this.stats.auditMissed = missed;
    this.stats.auditExtra = this.stats.trackedChunks - (this.emitted!.size - missed);
    const log = this.deps.log.child({ job: this.jobId, volume: this.volume.name });
    if (missed > 0) log.error({ missed, missedSample, changed: this.emitted!.size }, 'AUDIT FAILED: the tracker missed changed chunks');
    else log.info({ changed: this.emitted!.size, tracked: this.stats.trackedChunks, extra: this.stats.auditExtra }, 'audit passed: 0 missed');
  }

  private accumulate(st: ReturnType<ReturnType<typeof readChunks>['stats']>, base: TransferStats, ms: number): void {
    this.stats.chunksRead = base.chunksRead + st.chunksRead;
    this.stats.chunksZero = base.chunksZero + st.chunksZero;
    this.stats.chunksSent = base.chunksSent + st.chunksEmitted;
    this.stats.bytesRead = base.bytesRead + st.bytesRead;
    this.stats.bytesSent = base.bytesSent + st.bytesEmitted;
    this.stats.readSeconds = base.readSeconds + ms / 1000;
  }

  private progress(index: number, st: ReturnType<ReturnType<typeof readChunks>['stats']>, base: TransferStats): void {
    const now = Date.now();
    if (now - this.lastProgress < 500) return;
    this.lastProgress = now;
    this.deps
      .send(envelope('jobProgress', {
        jobId: this.jobId, chunksDone: index + 1, chunksTotal: this.stats.chunksTotal,
        bytesSent: base.bytesSent + st.bytesEmitted, phase: 'transfer',
      }))
      .catch(() => undefined);
  }
}

const EMPTY = Buffer.alloc(0);

function codeOf(code: string): BlocksnapError['code'] {
  return (/^E_[A-Z_]+$/.test(code) ? code : 'E_INTERNAL') as BlocksnapError['code'];
}
