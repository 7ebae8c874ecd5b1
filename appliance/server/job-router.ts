import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import {
  emptyTransferStats, envelope, JobMode, type BeginVolume, type ChunkBatch, type EndVolume, type Envelope, type JobResult, type TransferStats,
  type WalPiece,
} from '../../proto/messages.js';
import type { Catalog } from '../catalog/catalog.js';
import { ZERO_DIGEST, type ChunkStore } from '../store/chunk-store.js';
import { buildManifest, newImageId, writeManifest, type ManifestStats } from '../store/manifest.js';
import type { PgImageInfo } from '../store/pg-image-info.js';
import { ActiveJob, outcomeFromResult, type JobOutcome } from './active-job.js';
import type { AgentSession } from './agent-session.js';
import { Ingest } from './ingest.js';

export interface RouterOptions {
  storeDir: string;
  /** How long a job waits for its agent to reconnect and resume. */
  resumeGraceMs: number;
  /** Unacknowledged batch bytes an agent may have in flight per job (policed: 2× + one frame). */
  windowBytes: number;
  flushEveryBytes?: number;
  /** Audit the change tracker every N incrementals of a volume (0 = only on request). */
  auditEvery?: number;
}

/**
 * Routes job frames between agent sessions and ingests, and owns the
 * lifecycle of every running job (DESIGN.md §4.2, §5). All frames of one job
 * are processed in order on the job's promise chain; different jobs run
 * concurrently, each with its own Ingest.
 */
export class JobRouter {
  private readonly sessions = new Map<string, AgentSession>();
  private readonly jobs = new Map<string, ActiveJob>();

  constructor(
    readonly catalog: Catalog,
    private readonly store: ChunkStore,
    private readonly opts: RouterOptions,
    private readonly log: Logger,
  ) {}

  connectedAgents(): { agent: string; session: string; volumes: string[] }[] {
    return [...this.sessions.values()].map((s) => ({ agent: s.agent!.name, session: s.id, volumes: [...s.volumes.keys()] }));
  }

  activeJobs(): ActiveJob[] {
    return [...this.jobs.values()];
  }

  sessionReady(s: AgentSession): void {
    const name = s.agent!.name;
    const old = this.sessions.get(name);
    // One live connection per agent: a reconnect replaces the old socket.
    if (old && old !== s) old.refuse('E_PROTOCOL', 'replaced by a newer connection of the same agent');
    this.sessions.set(name, s);
    // A new agent process cannot resume what the old one was doing: end those jobs now, not after the grace period.
    for (const job of this.jobs.values()) {
      if (job.agent === name && !job.finished && job.instanceId !== s.instanceId) {
        this.fail(job, new BlocksnapError('E_DISCONNECTED', 'the agent restarted during the job'), false);
      }
    }
  }

  sessionClosed(s: AgentSession, err?: BlocksnapError): void {
    if (this.sessions.get(s.agent!.name) === s) this.sessions.delete(s.agent!.name);
    for (const job of this.jobs.values()) {
      if (job.sessionId !== s.id || job.finished) continue;
      if (job.state === 'committed') {
        // The image is visible; only the agent's report is missing.
        this.finish(job, { ok: true, jobId: job.id, imageId: job.imageId!, stats: { resultMissing: 1 } as any });
        continue;
      }
      // Make what arrived durable so the agent can resume from there.
      job.chain = job.chain.then(async () => {
        if (job.ingest && !job.finished) await job.ingest.flush();
      }).catch((e) => this.fail(job, toBlocksnapError(e, 'E_STORE_IO')));
      this.log.warn({ job: job.id, err: err?.code }, 'agent connection lost during job; waiting for resume');
      job.graceTimer = setTimeout(
        () => this.fail(job, new BlocksnapError('E_DISCONNECTED', `agent did not resume within ${this.opts.resumeGraceMs} ms`)),
        this.opts.resumeGraceMs,
      );
      job.graceTimer.unref();
    }
  }

  /**
   * Starts a backup on a connected agent. An audit (asked for, or due every
   * `auditEvery` incrementals of the volume) also proves the agent's change
   * tracker against a full comparison.
   */
  startJob(agentName: string, volume: string, mode: 'full' | 'incremental', opts: { audit?: boolean } = {}): ActiveJob {
    const s = this.sessions.get(agentName);
    if (!s) throw new BlocksnapError('E_NOT_FOUND', `agent ${agentName} is not connected`);
    if (!s.volumes.has(volume)) throw new BlocksnapError('E_UNKNOWN_VOLUME', `agent ${agentName} has no volume ${volume}`);
    for (const j of this.jobs.values()) {
      if (j.agent === agentName && j.volume === volume && !j.finished) {
        throw new BlocksnapError('E_BUSY', `job ${j.id} is already running on ${agentName}/${volume}`);
      }
    }
    const row = this.catalog.createJob(s.agent!.id, volume, mode);
    const job = new ActiveJob(row.id, agentName, s.agent!.id, volume, mode, s.id);
    job.instanceId = s.instanceId;
    this.jobs.set(job.id, job);
    this.catalog.setJobState(job.id, 'running');
    const audit = opts.audit ?? (mode === 'incremental' && this.auditDue(agentName, volume));
    s.send(envelope('runJob', { jobId: job.id, volume, mode: mode === 'full' ? JobMode.FULL : JobMode.INCREMENTAL, audit }));
    this.log.info({ job: job.id, agent: agentName, volume, mode, audit }, 'job dispatched');
    return job;
  }

  /** True when `auditEvery` committed incrementals of the volume ran since its last audit. */
  private auditDue(agent: string, volume: string): boolean {
    const every = this.opts.auditEvery ?? 0;
    if (every <= 0) return false;
    let since = 0;
    for (const j of this.catalog.listJobs(10_000)) {
      if (j.agent !== agent || j.volumeName !== volume || j.state !== 'committed') continue;
      if (j.stats?.audited) break;
      if (j.kind === 'incremental') since++;
    }
    return since >= every;
  }

  cancelJob(jobId: string, reason: string): void {
    const job = this.jobs.get(jobId);
    if (!job || job.finished) throw new BlocksnapError('E_UNKNOWN_JOB', `no running job ${jobId}`);
    this.sessionOf(job)?.send(envelope('cancelJob', { jobId, reason }));
    this.fail(job, new BlocksnapError('E_CANCELLED', reason));
  }

  onAgentFrame(s: AgentSession, env: Envelope): void {
    switch (env.kind) {
      case 'beginVolume':
        return this.onJobFrame(s, env.beginVolume.jobId, (job) => this.beginVolume(s, job, env.beginVolume));
      case 'chunkBatch': {
        const b = env.chunkBatch;
        const job = this.jobs.get(b.jobId);
        let bytes = 0;
        for (const c of b.chunks) bytes += c.data.length;
        if (job && job.agent === s.agent!.name && !job.finished) {
          job.queuedBytes += bytes;
          // An agent that ignores Acks would queue frames without bound; the window is its promise.
          if (job.queuedBytes > 2 * this.opts.windowBytes + (8 << 20)) {
            return this.fail(job, new BlocksnapError('E_PROTOCOL', `job ${job.id}: ${job.queuedBytes} bytes in flight, window is ${this.opts.windowBytes}`));
          }
        }
        return this.onJobFrame(s, b.jobId, async (j) => {
          try {
            await this.chunkBatch(s, j, b);
          } finally {
            j.queuedBytes -= bytes;
          }
        });
      }
      case 'endVolume':
        return this.onJobFrame(s, env.endVolume.jobId, (job) => this.endVolume(s, job, env.endVolume));
      case 'pgBackupInfo':
        return this.onJobFrame(s, env.pgBackupInfo.jobId, async (job) => {
          if (job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: pg info before begin`);
          job.pg = env.pgBackupInfo;
        });
      case 'walPiece':
        return this.onJobFrame(s, env.walPiece.jobId, (job) => this.walPiece(job, env.walPiece));
      case 'jobResult':
        return this.onJobFrame(s, env.jobResult.jobId, async (job) => this.jobResult(job, env.jobResult));
      case 'jobProgress': {
        const job = this.ownJob(s, env.jobProgress.jobId);
        if (job) job.progress(env.jobProgress);
        return;
      }
      case 'error': {
        const e = env.error;
        const job = e.jobId ? this.ownJob(s, e.jobId) : undefined;
        if (job) this.fail(job, new BlocksnapError(asCode(e.code), `agent: ${e.message}`), false);
        else this.log.warn({ session: s.id, code: e.code, message: e.message }, 'agent reported an error');
        return;
      }
      case 'pong':
        return;
      default:
        throw new BlocksnapError('E_PROTOCOL', `an agent may not send ${env.kind}`);
    }
  }

  /** Fails a job of this session's agent because of a bad frame; false if it is not theirs. */
  failOwnJob(s: AgentSession, jobId: string, err: BlocksnapError): boolean {
    const job = this.jobs.get(jobId);
    if (!job || job.agent !== s.agent!.name || job.finished) return false;
    this.fail(job, err);
    return true;
  }

  /** The job if it belongs to this session's agent; otherwise answers E_UNKNOWN_JOB and touches nothing. */
  private ownJob(s: AgentSession, jobId: string): ActiveJob | undefined {
    const job = this.jobs.get(jobId);
    if (!job || job.agent !== s.agent!.name || job.finished) {
      s.send(envelope('error', { jobId, code: 'E_UNKNOWN_JOB', message: `no running job ${jobId} for agent ${s.agent!.name}` }));
      return undefined;
    }
    return job;
  }

  private onJobFrame(s: AgentSession, jobId: string, fn: (job: ActiveJob) => Promise<void>): void {
    const job = this.ownJob(s, jobId);
    if (!job) return;
    job.lastActivity = Date.now();
    job.chain = job.chain
      .then(() => (job.finished ? undefined : fn(job)))
      .catch((e) => this.fail(job, toBlocksnapError(e)));
  }

  private async beginVolume(s: AgentSession, job: ActiveJob, b: BeginVolume): Promise<void> {
    if (b.volume !== job.volume) throw new BlocksnapError('E_PROTOCOL', `job ${job.id} is for volume ${job.volume}, not ${b.volume}`);
    if (job.graceTimer) clearTimeout(job.graceTimer);
    job.graceTimer = null;
    job.sessionId = s.id;
    if (b.resume) {
      if (!job.ingest) throw new BlocksnapError('E_PROTOCOL', `job ${job.id} has no transfer to resume`);
      if (job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id} cannot resume in state ${job.state}`);
      await job.ingest.flush();
      job.ingest.resumed();
      job.resumes++;
      this.log.info({ job: job.id, resumeFrom: job.ingest.durableNext }, 'transfer resumed');
      s.send(envelope('volumeReady', { jobId: job.id, basisAccepted: job.basisAccepted, resumeFrom: job.ingest.durableNext, reason: '' }));
      return;
    }
    if (job.ingest) throw new BlocksnapError('E_PROTOCOL', `job ${job.id} already began its volume`);
    const vol = this.catalog.upsertVolume(job.agentId, job.volume, b.volumeSize, b.chunkSize);
    job.volumeId = vol.id;
    const last = this.catalog.lastImage(vol.id);
    let reason = '';
    if (b.mode === JobMode.INCREMENTAL) {
      if (!last) reason = 'the volume has no image yet';
      else if (b.basisImageId !== last.id) reason = `basis ${b.basisImageId || '(none)'} is not the last image ${last.id}`;
      else if (last.volumeSize !== b.volumeSize || last.chunkSize !== b.chunkSize) reason = 'volume size or chunk size changed';
      else job.basisAccepted = true;
    }
    const mode = job.basisAccepted ? 'incremental' : 'full';
    job.basisImageId = job.basisAccepted ? last!.id : null;
    job.ingest = await Ingest.open(this.store, {
      jobId: job.id, volumeSize: b.volumeSize, chunkSize: b.chunkSize, mode,
      basisRootDigest: job.basisAccepted ? Buffer.from(last!.rootDigest, 'hex') : undefined,
      flushEveryBytes: this.opts.flushEveryBytes,
    }, this.log);
    job.state = 'transferring';
    this.catalog.setJobState(job.id, 'running', { volumeId: vol.id, kind: mode });
    if (reason) this.log.info({ job: job.id, reason }, 'basis refused: the job becomes a full');
    s.send(envelope('volumeReady', { jobId: job.id, basisAccepted: job.basisAccepted, resumeFrom: 0, reason }));
  }

  private async chunkBatch(s: AgentSession, job: ActiveJob, b: ChunkBatch): Promise<void> {
    if (!job.ingest || job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: chunks before begin`);
    if (b.seq <= job.ingest.seq) return; // a resent batch already processed before a reconnect
    await job.ingest.addBatch(b.seq, b.chunks);
    s.send(envelope('ack', { jobId: job.id, seq: b.seq, durableNext: job.ingest.durableNext }));
  }

  private async walPiece(job: ActiveJob, w: WalPiece): Promise<void> {
    if (!job.ingest || job.state !== 'transferring' || !job.pg) {
      throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: WAL before the PostgreSQL backup info`);
    }
    let file = job.wal.get(w.fileName);
    if (!file) {
      if (job.wal.size >= 64) throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: more than 64 WAL files`);
      file = { size: w.fileSize, pieces: new Map() };
      job.wal.set(w.fileName, file);
    }
    if (file.size !== w.fileSize) throw new BlocksnapError('E_PROTOCOL', `WAL ${w.fileName}: size changed`);
    const { zero } = await job.ingest.putExtra(`WAL ${w.fileName}@${w.offset}`, w.digest, w.data, w.plainLength);
    const digest = (zero ? ZERO_DIGEST : Buffer.from(w.digest)).toString('hex');
    file.pieces.set(w.offset, { offset: w.offset, length: w.plainLength, digest });
  }

  /** The manifest's `pg` section; validatePgInfo (via the manifest) checks the pieces cover every file. */
  private pgInfo(job: ActiveJob): PgImageInfo | undefined {
    const p = job.pg;
    if (!p) return undefined;
    const wal = [...job.wal.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([name, f]) => ({
      name, size: f.size, pieces: [...f.pieces.values()].sort((a, b) => a.offset - b.offset),
    }));
    return {
      labelFile: p.labelFile, spcmapFile: p.spcmapFile, startLsn: p.startLsn, stopLsn: p.stopLsn, timeline: p.timeline,
      replayLsn: p.replayLsn, exclusive: p.exclusive, serverVersion: p.serverVersion, role: p.role as 'primary' | 'standby',
      pausedSeconds: p.pausedSeconds, backupSeconds: p.backupSeconds, walSegmentSize: p.walSegmentSize, wal,
    };
  }

  private async endVolume(s: AgentSession, job: ActiveJob, e: EndVolume): Promise<void> {
    if (!job.ingest || job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: end before begin`);
    const ingest = job.ingest;
    const { rootDigest } = await ingest.finish(e.nextIndex);
    const st = ingest.stats;
    const agentStats = e.stats;
    const stats: ManifestStats = {
      chunksTotal: ingest.chunkCount, chunksReceived: st.chunksReceived, chunksZero: st.chunksZero,
      chunksStored: st.chunksStored, bytesReceived: st.bytesReceived, bytesStored: st.bytesStored,
      pagesWritten: st.pagesWritten, pagesShared: st.pagesShared, resumes: job.resumes,
      chunksRead: agentStats?.chunksRead ?? 0, bytesRead: agentStats?.bytesRead ?? 0,
      freezeSeconds: agentStats?.freezeSeconds ?? 0,
    };
    const m = buildManifest({
      imageId: newImageId(), agent: job.agent, volume: job.volume, volumeSize: ingest.params.volumeSize,
      chunkSize: ingest.params.chunkSize, kind: ingest.params.mode, basisImageId: job.basisImageId,
      jobId: job.id, rootDigest: rootDigest.toString('hex'), stats, pg: this.pgInfo(job),
    });
    await writeManifest(this.opts.storeDir, m); // the commit point
    this.catalog.insertImage({
      id: m.imageId, agent: m.agent, volume: m.volume, jobId: job.id, kind: m.kind, basisImageId: m.basisImageId,
      rootDigest: m.rootDigest, volumeSize: m.volumeSize, chunkSize: m.chunkSize, createdAt: m.createdAt, stats,
      pg: m.pg ?? null,
    });
    job.imageId = m.imageId;
    job.state = 'committed';
    this.catalog.finishJob(job.id, { state: 'committed', imageId: m.imageId, stats: { ...agentStats, ...stats } });
    this.log.info({ job: job.id, image: m.imageId, ...stats }, 'image committed');
    const wire: TransferStats = {
      ...(agentStats ?? emptyTransferStats()), bytesStored: st.bytesStored, chunksStored: st.chunksStored,
    };
    s.send(envelope('committed', { jobId: job.id, imageId: m.imageId, stats: wire }));
  }

  private async jobResult(job: ActiveJob, r: JobResult): Promise<void> {
    if (r.ok) {
      if (job.state !== 'committed' || r.imageId !== job.imageId) {
        throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: success reported for image ${r.imageId} that was not committed`);
      }
      const merged = { ...this.catalog.job(job.id)?.stats, ...r.stats, bytesStored: job.ingest?.stats.bytesStored ?? 0, chunksStored: job.ingest?.stats.chunksStored ?? 0 };
      this.catalog.finishJob(job.id, { state: 'committed', imageId: job.imageId!, stats: merged });
      this.finish(job, { ...outcomeFromResult(r), stats: merged });
    } else {
      this.fail(job, new BlocksnapError(asCode(r.errorCode), r.errorMessage || 'agent reported failure'), false);
    }
  }

  private finish(job: ActiveJob, outcome: JobOutcome): void {
    job.settle(outcome);
    this.jobs.delete(job.id);
  }

  /** Aborts a job: nothing of it becomes visible; tells the agent unless it told us. */
  fail(job: ActiveJob, err: BlocksnapError, tellAgent = true): void {
    if (job.finished) return;
    if (job.state === 'committed') {
      // Too late to abort: the image is durable and visible. Record the problem, keep the image.
      this.log.warn({ job: job.id, err: err.code }, 'error after commit');
      this.finish(job, { ok: true, jobId: job.id, imageId: job.imageId!, errorCode: err.code, errorMessage: err.message });
      return;
    }
    this.log.warn({ job: job.id, code: err.code, message: err.message }, 'job failed');
    if (tellAgent) this.sessionOf(job)?.send(envelope('error', { jobId: job.id, code: err.code, message: err.message }));
    const ingest = job.ingest;
    // After any frame still being processed, so the writer is not aborted mid-put.
    if (ingest) job.chain = job.chain.then(() => ingest.abort()).catch(() => undefined);
    const state = err.code === 'E_CANCELLED' ? 'cancelled' : 'failed';
    this.catalog.finishJob(job.id, { state, errorCode: err.code, errorMessage: err.message });
    this.finish(job, { ok: false, jobId: job.id, errorCode: err.code, errorMessage: err.message });
  }

  private sessionOf(job: ActiveJob): AgentSession | undefined {
    const s = this.sessions.get(job.agent);
    return s && s.id === job.sessionId ? s : undefined;
  }

  async shutdown(): Promise<void> {
    for (const job of this.jobs.values()) this.fail(job, new BlocksnapError('E_CANCELLED', 'appliance shutting down'));
  }
}

function asCode(code: string): BlocksnapError['code'] {
  return (code && /^E_[A-Z_]+$/.test(code) ? code : 'E_INTERNAL') as BlocksnapError['code'];
}
