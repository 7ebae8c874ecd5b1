import { rm } from 'node:fs/promises';
import { imageRootDigest } from '../proto/shared/image-root.js';
import type { Logger } from 'pino';
import { BlocksnapError, isBlocksnapError, toBlocksnapError } from '../proto/errors.js';
import {
  emptyTransferStats, envelope, JobMode, type Chunk, type Committed, type Envelope, type EnvelopeKind, type MessageMap,
  type RunJob, type TransferStats, type VolumeReady,
} from '../proto/messages.js';
import { FileBlockDevice } from './blockdev/file-block-device.js';
import type { ReadStats } from './reader/chunk-reader.js';
import type { Snapshot, SnapshotProvider, VolumeSpec } from './snapshot/snapshot-provider.js';
import { DigestMap, digestMapPath } from './state/digest-map.js';
import { FlowWindow } from './flow-window.js';
import { captureGroup, type CaptureResult } from './capture.js';
import type { PostgresConfig } from './config.js';
import type { QuiescerFactory } from './pg/quiescer.js';
import { TrackerAudit } from './audit/tracker-audit.js';
import { readSnapshot } from './transfer/snapshot-reader.js';
import { walPieces } from './transfer/wal-pieces.js';
import type { SwitchResult, VolumeTracking } from './cbt/volume-tracking.js';

export interface RunnerDeps {
  stateDir: string;
  provider: SnapshotProvider;
  log: Logger;
  windowBytes: number;
  batchBytes: number;
  workers: number;
  /** zstd level of chunk data (default 1). */
  compressionLevel?: number;
  /** Sends on the current connection; rejects E_DISCONNECTED when there is none. */
  send(env: Envelope): Promise<void>;
  /** Resolves when a (new) session is up; rejects after the timeout. */
  waitConnected(timeoutMs: number): Promise<void>;
  resumeTimeoutMs: number;
  replyTimeoutMs: number;
  /** Changed-block tracking of a volume of the job, if it is tracked. */
  trackingOf?: (volume: string) => VolumeTracking | undefined;
  /** The PostgreSQL server whose data the volumes hold (its WAL facts and WAL; see capture.ts). */
  postgres?: PostgresConfig;
  /** Quiesces the database around each job's snapshot (composed by the agent from its config). */
  quiescer?: QuiescerFactory;
  /** How often the job tells the appliance it is alive (default 10 s; the appliance gives up after 5 min of silence). */
  heartbeatMs?: number;
}


type Waiter = { kind: EnvelopeKind; resolve: (m: any) => void; reject: (e: BlocksnapError) => void; timer: NodeJS.Timeout };

/** What the job holds and learns of one volume (a lone volume, or a member of a group). */
interface MemberRun {
  volume: VolumeSpec;
  tracking?: VolumeTracking;
  snapshot: Snapshot | null;
  /** The tracker generation closed at this job's snapshot. */
  switched: SwitchResult | null;
  stats: TransferStats;
  /** The tracker audit's tally of chunks that really changed (audited jobs only). */
  audit: TrackerAudit | null;
  /** The digest map to save once the appliance confirms the commit. */
  next: DigestMap | null;
  imageId: string | null;
}

/** The target of a job: a lone volume, or a consistency group (DESIGN.md §4.4). */
export interface JobTarget {
  volumes: VolumeSpec[];
  /** Set for a group (even of one): its members are committed together by CommitSet. */
  group?: string;
}

/**
 * Runs one backup job on the agent (DESIGN.md §4.2): snapshot, begin, stream
 * chunks under the flow window, end, wait for the commit, then save the new
 * digest map and drop the snapshot. The snapshot is removed whatever
 * happens. A dropped connection is not a failure: the runner waits for the
 * agent to reconnect and resumes from the appliance's durable point.
 *
 * A group job snapshots every member at one instant, then transfers the
 * members one after another (BeginVolume … EndVolume each) and ends with
 * CommitSet; the appliance commits all member images or none.
 */
export class JobRunner {
  readonly jobId: string;
  private waiters: Waiter[] = [];
  /** An error that ends the job (appliance Error, cancel): not retryable. */
  private fatal: BlocksnapError | null = null;
  private readonly abort = new AbortController();
  private readonly window: FlowWindow;
  /** What PostgreSQL's quiesce window returned, and the WAL to send. */
  private pg: CaptureResult['pg'] = null;
  /** Set once the runner holds nothing of its volumes any more (snapshots released). */
  released = false;
  private lastProgress = 0;
  private readonly members: MemberRun[];
  private readonly group: string | undefined;
  /** Last batch seq sent: one sequence per job, across members. */
  private seq = 0;

  constructor(
    private readonly deps: RunnerDeps,
    private readonly job: RunJob,
    target: VolumeSpec | JobTarget,
  ) {
    this.jobId = job.jobId;
    this.window = new FlowWindow(deps.windowBytes);
    const t: JobTarget = 'volumes' in target ? target : { volumes: [target] };
    this.group = t.group;
    this.members = t.volumes.map((volume) => ({
      volume, tracking: deps.trackingOf?.(volume.name), snapshot: null, switched: null, stats: emptyTransferStats(),
      audit: null, next: null, imageId: null,
    }));
  }

  /** The volumes this job holds exclusively. */
  get volumeNames(): string[] {
    return this.members.map((m) => m.volume.name);
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
   * The snapshots are removed before the result is sent, so when the
   * appliance sees the job end, the agent holds nothing of it any more.
   */
  async run(): Promise<{ ok: boolean; imageId?: string; error?: BlocksnapError; stats: TransferStats }> {
    const log = this.deps.log.child({ job: this.jobId, volume: this.group ?? this.members[0]!.volume.name });
    let outcome: { ok: boolean; imageId?: string; error?: BlocksnapError; stats: TransferStats };
    // Quiescing, snapshotting and releasing send nothing else: without a heartbeat the appliance
    // could not tell a long checkpoint from an agent that went silent (its job idle timeout).
    const heartbeat = setInterval(() => {
      this.deps.send(envelope('jobProgress', { jobId: this.jobId, chunksDone: 0, chunksTotal: 0, bytesSent: 0, phase: 'heartbeat' }))
        .catch(() => undefined);
    }, this.deps.heartbeatMs ?? 10_000);
    heartbeat.unref();
    try {
      const cap = await captureGroup({
        jobId: this.jobId, members: this.members.map((m) => ({ volume: m.volume, tracking: m.tracking })), group: this.group,
        provider: this.deps.provider, quiescer: this.deps.quiescer, postgres: this.deps.postgres, log,
      });
      cap.members.forEach((c, i) => {
        const m = this.members[i]!;
        m.snapshot = c.snapshot;
        m.switched = c.switched;
        m.stats.freezeSeconds = c.snapshot.freezeSeconds;
        m.stats.snapshotSeconds = c.snapshot.snapshotSeconds;
      });
      this.pg = cap.pg;
      const first = cap.members[0]!.snapshot;
      log.info({ freezeSeconds: first.freezeSeconds, snapshotSeconds: first.snapshotSeconds, volumes: this.volumeNames }, 'snapshot taken');
      let committed: Committed | null = null;
      for (const [i, m] of this.members.entries()) {
        committed = await this.transfer(m, i === this.members.length - 1, log);
      }
      const imageOf = new Map((committed!.images ?? []).map((x) => [x.volume, x.imageId]));
      for (const m of this.members) {
        m.imageId = this.group ? imageOf.get(m.volume.name) ?? null : committed!.imageId;
        if (!m.imageId) throw new BlocksnapError('E_PROTOCOL', `the appliance committed no image for member ${m.volume.name}`);
      }
      // Only now is every member durable on the appliance: save the digest maps, move the tracker bases.
      for (const m of this.members) {
        m.next!.setImageId(m.imageId!);
        await m.next!.write(digestMapPath(this.deps.stateDir, m.volume.name));
        await m.tracking?.committed(m.imageId!).catch((e) => log.error({ err: e, volume: m.volume.name }, 'cannot record the tracker basis'));
      }
      const stored = committed!.stats;
      if (this.members.length === 1) {
        this.members[0]!.stats = { ...this.members[0]!.stats, bytesStored: stored?.bytesStored ?? 0, chunksStored: stored?.chunksStored ?? 0 };
      }
      const stats = { ...this.jobStats(), ...(this.members.length > 1 ? { bytesStored: stored?.bytesStored ?? 0, chunksStored: stored?.chunksStored ?? 0 } : {}) };
      log.info({ image: committed!.imageId, set: committed!.setId || undefined, ...stats }, 'job committed');
      outcome = { ok: true, imageId: committed!.imageId, stats };
    } catch (e) {
      const err = this.fatal ?? toBlocksnapError(e);
      log.warn({ code: err.code, message: err.message }, 'job failed');
      outcome = { ok: false, error: err, stats: this.jobStats() };
      if (err.code === 'E_INTEGRITY') {
        // The appliance's image was not the one we read. Our digest map may be what is wrong (it
        // must equal the basis image): forget it, so the next job is a full that proves itself.
        for (const m of this.members) {
          await rm(digestMapPath(this.deps.stateDir, m.volume.name), { force: true })
            .catch((e) => log.error({ err: e, volume: m.volume.name }, 'cannot remove the digest map'));
        }
        log.error({ volumes: this.volumeNames }, 'image integrity check failed: local digest maps dropped, the next job is a full');
      }
      // Changes the failed job saw must count again for the next one.
      for (const m of this.members) {
        if (m.switched) await m.tracking?.failed(m.switched).catch((e) => log.error({ err: e }, 'tracker absorb failed'));
      }
    }
    this.abort.abort();
    for (const m of this.members) {
      const snapshot = m.snapshot;
      if (snapshot) await this.deps.provider.remove(snapshot).catch((e) => log.error({ err: e, snapshot: snapshot.id }, 'snapshot removal failed'));
    }
    this.released = true;
    clearInterval(heartbeat);
    if (outcome.ok) {
      await this.report({ jobId: this.jobId, ok: true, imageId: outcome.imageId!, errorCode: '', errorMessage: '', stats: outcome.stats });
    } else if (!this.fatal || outcome.error!.code === 'E_CANCELLED') {
      // The appliance already knows about errors it sent us.
      const err = outcome.error!;
      await this.report({ jobId: this.jobId, ok: false, imageId: '', errorCode: err.code, errorMessage: err.message, stats: outcome.stats });
    }
    return outcome;
  }

  /** The job's stats: a lone volume's own; a group's summed over members (times: the shared freeze, the summed read). */
  private jobStats(): TransferStats {
    if (this.members.length === 1) return this.members[0]!.stats;
    const out = emptyTransferStats();
    const sources = new Set<string>();
    const reasons: string[] = [];
    for (const m of this.members) {
      const st = m.stats;
      for (const k of ['chunksTotal', 'chunksRead', 'chunksSent', 'chunksZero', 'bytesRead', 'bytesSent', 'bytesStored', 'chunksStored',
        'trackedChunks', 'auditChanged', 'auditMissed', 'auditExtra', 'readSeconds'] as const) out[k] += st[k];
      out.freezeSeconds = Math.max(out.freezeSeconds, st.freezeSeconds);
      out.snapshotSeconds = Math.max(out.snapshotSeconds, st.snapshotSeconds);
      out.audited ||= st.audited;
      if (st.changeSource) sources.add(st.changeSource);
      if (st.fallbackReason) reasons.push(`${m.volume.name}: ${st.fallbackReason}`);
    }
    out.changeSource = [...sources].join(',').slice(0, 200);
    out.fallbackReason = reasons.join('; ').slice(0, 4000);
    return out;
  }

  private async report(result: MessageMap['jobResult']): Promise<void> {
    await this.deps.send(envelope('jobResult', result)).catch((e) => this.deps.log.warn({ err: e, job: this.jobId }, 'could not report job result'));
  }

  /**
   * Transfers one member: BeginVolume, chunks, EndVolume. The last member
   * also carries the PostgreSQL info and WAL, then (group) CommitSet, and
   * waits for Committed, which it returns. A lost connection resumes the
   * same member from the appliance's durable point.
   */
  private async transfer(m: MemberRun, last: boolean, log: Logger): Promise<Committed | null> {
    const snapshot = m.snapshot!;
    const dev = await FileBlockDevice.open(snapshot.path);
    const volumeSize = dev.size;
    await dev.close();
    const chunkSize = m.volume.chunkSize;
    const mapFile = digestMapPath(this.deps.stateDir, m.volume.name);
    let basis: DigestMap | null = null;
    if (this.job.mode === JobMode.INCREMENTAL) {
      basis = await DigestMap.readIfValid(mapFile);
      if (basis && (basis.volumeSize !== volumeSize || basis.chunkSize !== chunkSize)) {
        m.stats.fallbackReason = 'volume geometry changed since the last image';
        basis = null;
      } else if (!basis) {
        m.stats.fallbackReason = 'no valid local digest map';
      }
    }
    const begin = {
      jobId: this.jobId, volume: m.volume.name, volumeSize, chunkSize, basisImageId: basis?.imageId ?? '',
      mode: basis ? JobMode.INCREMENTAL : JobMode.FULL, resume: false,
    };
    await this.deps.send(envelope('beginVolume', begin));
    let ready: VolumeReady;
    try {
      ready = await this.expect('volumeReady');
    } catch (e) {
      if (this.fatal || !isBlocksnapError(e, 'E_DISCONNECTED')) throw e;
      // The appliance may or may not have opened the member: a resume answers either way.
      ready = await this.resume(begin, log);
    }
    if (!ready.basisAccepted && basis) {
      m.stats.fallbackReason = `appliance refused the basis: ${ready.reason}`;
      basis = null;
    }
    const mode = basis ? 'incremental' : 'full';
    m.stats.changeSource = basis ? 'digest-compare' : 'full';
    const plan = this.selection(m, basis);
    log.info({ volume: m.volume.name, mode, basis: basis?.imageId, fallback: m.stats.fallbackReason || undefined }, 'transfer starting');
    const next = basis ? basis.copy() : DigestMap.create({ volumeSize, chunkSize, imageId: 'pending' });
    m.next = next;
    m.stats.chunksTotal = next.chunkCount;

    for (;;) {
      try {
        this.seq = await this.stream(m, snapshot.path, volumeSize, chunkSize, mode, basis, next, ready.resumeFrom, this.seq, plan.select);
        if (m.audit) this.finishAudit(m, m.audit);
        if (last) await this.sendPg();
        // The root of the image we read: the appliance commits only if it built the same one.
        const expectedRoot = imageRootDigest(volumeSize, chunkSize, next.bytes());
        await this.deps.send(envelope('endVolume', { jobId: this.jobId, nextIndex: next.chunkCount, stats: m.stats, expectedRoot }));
        if (!last) return null;
        if (this.group) await this.deps.send(envelope('commitSet', { jobId: this.jobId }));
        return await this.expect('committed', this.deps.replyTimeoutMs * 4);
      } catch (e) {
        if (this.fatal || !isBlocksnapError(e, 'E_DISCONNECTED')) throw e;
        ready = await this.resume(begin, log);
      }
    }
  }

  private async resume(begin: MessageMap['beginVolume'], log: Logger): Promise<VolumeReady> {
    log.warn({ volume: begin.volume }, 'connection lost during transfer; waiting to resume');
    await this.deps.waitConnected(this.deps.resumeTimeoutMs);
    if (this.fatal) throw this.fatal;
    this.window.reset();
    await this.deps.send(envelope('beginVolume', { ...begin, resume: true }));
    const ready = await this.expect('volumeReady');
    log.info({ volume: begin.volume, resumeFrom: ready.resumeFrom, lastSeq: this.seq }, 'transfer resumed');
    return ready;
  }

  /** Reads from `from` and sends batches; returns the last seq used. */
  private async stream(
    m: MemberRun, path: string, volumeSize: number, chunkSize: number, mode: 'full' | 'incremental',
    basis: DigestMap | null, next: DigestMap, from: number, seq: number, select: Uint32Array | undefined,
  ): Promise<number> {
    const stream = await readSnapshot(
      {
        path, volumeSize, chunkSize, startIndex: from, mode, basisDigests: basis ? basis.bytes() : undefined, select,
        compressionLevel: this.deps.compressionLevel,
      },
      { workers: this.deps.workers, signal: this.abort.signal },
    );
    const started = performance.now();
    const base = { ...m.stats };
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
      m.audit?.changedChunk(c.index);
      const data = c.data ?? EMPTY;
      batch.push({ index: c.index, digest: c.zero ? EMPTY : c.digest, zero: c.zero, data, plainLength: c.plainLength });
      batchBytes += data.length + 64;
      if (batchBytes >= this.deps.batchBytes) await flush();
      this.progress(m, c.index, stream.stats(), base);
    }
    await flush();
    const st = stream.stats();
    this.accumulate(m, st, base, performance.now() - started);
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
    for (const seg of pg.wal) {
      for (const piece of walPieces(this.jobId, seg)) await this.deps.send(envelope('walPiece', piece));
    }
  }

  /**
   * Which chunks to read. With a valid tracker generation relative to the
   * same basis, only the marked chunks (changeSource 'tracker'); otherwise
   * all of them, compared by digest, with the reason recorded. An audit
   * reads all of them and afterwards proves the bitmap covered every change.
   */
  private selection(m: MemberRun, basis: DigestMap | null): { select?: Uint32Array } {
    const sw = m.switched;
    if (!basis) return {};
    if (!m.tracking) {
      m.stats.fallbackReason ||= 'volume is not tracked';
      return {};
    }
    if (!sw) {
      m.stats.fallbackReason ||= 'tracker switch failed';
      return {};
    }
    m.stats.trackedChunks = sw.closed.bitmap.count();
    if (!sw.closed.validity.valid) {
      m.stats.fallbackReason = `tracker: ${sw.closed.validity.reason}`;
      return {};
    }
    if (sw.basisImageId !== basis.imageId) {
      m.stats.fallbackReason = `tracker bitmap is relative to ${sw.basisImageId ?? 'no image'}, basis is ${basis.imageId}`;
      return {};
    }
    if (this.job.audit) {
      m.audit = new TrackerAudit(sw.closed.bitmap.words, m.stats.trackedChunks);
      m.stats.changeSource = 'digest-compare (audit)';
      return {};
    }
    m.stats.changeSource = 'tracker';
    return { select: sw.closed.bitmap.words };
  }

  private finishAudit(m: MemberRun, audit: TrackerAudit): void {
    const r = audit.result();
    m.stats.audited = true;
    m.stats.auditChanged = r.changed;
    m.stats.auditMissed = r.missed;
    m.stats.auditExtra = r.extra;
    const log = this.deps.log.child({ job: this.jobId, volume: m.volume.name });
    if (r.missed > 0) log.error(r, 'AUDIT FAILED: the tracker missed changed chunks');
    else log.info(r, 'audit passed: 0 missed');
  }

  private accumulate(m: MemberRun, st: ReadStats, base: TransferStats, ms: number): void {
    m.stats.chunksRead = base.chunksRead + st.chunksRead;
    m.stats.chunksZero = base.chunksZero + st.chunksZero;
    m.stats.chunksSent = base.chunksSent + st.chunksEmitted;
    m.stats.bytesRead = base.bytesRead + st.bytesRead;
    m.stats.bytesSent = base.bytesSent + st.bytesEmitted;
    m.stats.readSeconds = base.readSeconds + ms / 1000;
  }

  private progress(m: MemberRun, index: number, st: ReadStats, base: TransferStats): void {
    const now = Date.now();
    if (now - this.lastProgress < 500) return;
    this.lastProgress = now;
    this.deps
      .send(envelope('jobProgress', {
        jobId: this.jobId, chunksDone: index + 1, chunksTotal: m.stats.chunksTotal,
        bytesSent: base.bytesSent + st.bytesEmitted, phase: 'transfer',
      }))
      .catch(() => undefined);
  }
}

const EMPTY = Buffer.alloc(0);

function codeOf(code: string): BlocksnapError['code'] {
  return (/^E_[A-Z_]+$/.test(code) ? code : 'E_INTERNAL') as BlocksnapError['code'];
}
