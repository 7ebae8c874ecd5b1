import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import {
  emptyTransferStats, envelope, JobMode, type BeginVolume, type ChunkBatch, type EndVolume, type Envelope, type JobResult, type TransferStats,
  type WalPiece,
} from '../../proto/messages.js';
import type { Catalog } from '../catalog/catalog.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { ManifestStats } from '../store/manifest.js';
import { auditDue } from '../jobs/audit-schedule.js';
import { decideBasis } from '../jobs/basis-policy.js';
import { commitImage, commitImageSet, type CommitContext, type SealedMember } from '../jobs/image-commit.js';
import { ActiveJob, outcomeFromResult, type JobOutcome, type MemberTransfer } from './active-job.js';
import type { AgentSession } from './agent-session.js';
import { Ingest } from './ingest.js';
import { RestoreServer } from '../restore/restore-server.js';
import type { ManifestStore } from '../store/manifest-store.js';

export interface RouterOptions {
  /** Where the commit puts manifests (DESIGN.md §5). */
  manifests: ManifestStore;
  /** How long a job waits for its agent to reconnect and resume. */
  resumeGraceMs: number;
  /** Unacknowledged batch bytes an agent may have in flight per job (policed: 2× + one frame). */
  windowBytes: number;
  flushEveryBytes?: number;
  /** Audit the change tracker every N incrementals of a volume (0 = only on request). */
  auditEvery?: number;
  /**
   * A connected agent that sends nothing for a job this long (agents send a
   * heartbeat every JOB_HEARTBEAT_MS, even while quiescing or snapshotting)
   * has lost it: the job fails E_TIMEOUT and frees the volume. Default 5 min.
   */
  jobIdleTimeoutMs?: number;
}

/**
 * What the router charges against a job's flow window for each chunk besides
 * its data: the agent's FlowWindow reserves data + CHUNK_OVERHEAD per chunk,
 * so a flood of zero chunks (no data) is bounded like any other batch.
 */
export const CHUNK_OVERHEAD = 64;

/**
 * Routes job frames between agent sessions and ingests, and owns the
 * lifecycle of every running job (DESIGN.md §4.2, §5). All frames of one job
 * are processed in order on the job's promise chain; different jobs run
 * concurrently, each with its own Ingest. Policy lives in named modules
 * (../jobs/): the basis check, the commit, WAL assembly, the audit schedule.
 */
export class JobRouter {
  private readonly sessions = new Map<string, AgentSession>();
  private readonly jobs = new Map<string, ActiveJob>();
  private readonly idleTimer: NodeJS.Timeout;
  /** Instant-mount frames (appliance/mounts/mount-protocol.ts); null while the appliance serves no NBD. */
  mountFrames: ((s: AgentSession, env: Envelope) => void) | null = null;
  /** Called when an agent's session is ready (the mount protocol tells it which of its mounts ended). */
  onSessionReady: ((s: AgentSession) => void) | null = null;
  /** Restores agents ask for over their sessions (DESIGN.md §4.6). */
  readonly restores: RestoreServer;

  constructor(
    readonly catalog: Catalog,
    private readonly store: ChunkStore,
    private readonly opts: RouterOptions,
    private readonly log: Logger,
  ) {
    this.restores = new RestoreServer(catalog, store, log);
    const idle = opts.jobIdleTimeoutMs ?? 5 * 60_000;
    this.idleTimer = setInterval(() => this.expireIdleJobs(idle), Math.max(50, Math.min(5_000, idle / 4)));
    this.idleTimer.unref();
  }

  /** Ends jobs whose connected agent went silent (a disconnected one has the resume grace timer instead). */
  private expireIdleJobs(idleMs: number): void {
    const now = Date.now();
    for (const job of this.jobs.values()) {
      if (job.finished || job.graceTimer || now - job.lastActivity < idleMs) continue;
      if (job.state === 'committed') {
        // The image is visible; only the agent's report never came.
        this.log.warn({ job: job.id }, 'no job result from the agent; the committed image stands');
        this.finish(job, { ok: true, jobId: job.id, imageId: job.imageId!, stats: { resultMissing: 1 } as any });
        continue;
      }
      this.fail(job, new BlocksnapError('E_TIMEOUT', `job ${job.id}: nothing from the agent for ${Math.round((now - job.lastActivity) / 1000)} s`));
    }
  }

  connectedAgents(): { agent: string; session: string; volumes: string[] }[] {
    return [...this.sessions.values()].map((s) => ({ agent: s.agent!.name, session: s.id, volumes: [...s.volumes.keys()] }));
  }

  /** The live session of an agent, if connected. */
  sessionOfAgent(name: string): AgentSession | undefined {
    return this.sessions.get(name);
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
    this.onSessionReady?.(s);
    // A new agent process cannot resume what the old one was doing: end those jobs now, not after the grace period.
    for (const job of this.jobs.values()) {
      if (job.agent === name && !job.finished && job.instanceId !== s.instanceId) {
        this.fail(job, new BlocksnapError('E_DISCONNECTED', 'the agent restarted during the job'), false);
      }
    }
  }

  sessionClosed(s: AgentSession, err?: BlocksnapError): void {
    if (this.sessions.get(s.agent!.name) === s) this.sessions.delete(s.agent!.name);
    this.restores.sessionClosed(s.id);
    for (const job of this.jobs.values()) {
      if (job.sessionId !== s.id || job.finished) continue;
      if (job.state === 'committed') {
        // The image is visible; only the agent's report is missing.
        this.finish(job, { ok: true, jobId: job.id, imageId: job.imageId!, stats: { resultMissing: 1 } as any });
        continue;
      }
      // Make what arrived durable so the agent can resume from there.
      job.chain = job.chain.then(async () => {
        if (job.ingest && !job.ingest.isClosed && !job.finished) await job.ingest.flush();
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
    // A group's name means all its members, one image set (DESIGN.md §4.4).
    const groupMembers = s.groups.get(volume);
    if (!groupMembers && !s.volumes.has(volume)) throw new BlocksnapError('E_UNKNOWN_VOLUME', `agent ${agentName} has no volume or group ${volume}`);
    if (!groupMembers) {
      for (const [g, members] of s.groups) {
        if (members.includes(volume)) {
          throw new BlocksnapError('E_USAGE', `volume ${volume} is a member of consistency group ${g}: back up group ${g} instead (a member alone is not consistent with the others)`);
        }
      }
    }
    const members = groupMembers ?? [volume];
    for (const j of this.jobs.values()) {
      if (j.agent === agentName && !j.finished && j.members.some((m) => members.includes(m))) {
        throw new BlocksnapError('E_BUSY', `job ${j.id} is already running on ${agentName}/${j.volume}`);
      }
    }
    const row = this.catalog.createJob(s.agent!.id, volume, mode);
    const job = new ActiveJob(row.id, agentName, s.agent!.id, volume, mode, s.id, [...members], !!groupMembers);
    job.instanceId = s.instanceId;
    this.jobs.set(job.id, job);
    this.catalog.setJobState(job.id, 'running');
    const audit = opts.audit ?? (mode === 'incremental' && auditDue(this.catalog, agentName, volume, this.opts.auditEvery ?? 0));
    s.send(envelope('runJob', { jobId: job.id, volume, mode: mode === 'full' ? JobMode.FULL : JobMode.INCREMENTAL, audit }));
    this.log.info({ job: job.id, agent: agentName, volume, members: job.group ? members : undefined, mode, audit }, 'job dispatched');
    return job;
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
        for (const c of b.chunks) bytes += c.data.length + CHUNK_OVERHEAD;
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
      case 'commitSet':
        return this.onJobFrame(s, env.commitSet.jobId, (job) => this.commitSet(s, job));
      case 'pgBackupInfo':
        return this.onJobFrame(s, env.pgBackupInfo.jobId, async (job) => {
          if (job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: pg info before begin`);
          if (job.current?.ended) return; // resent after a resume: what the ended member carried is final
          job.wal.setInfo(env.pgBackupInfo);
        });
      case 'walPiece':
        return this.onJobFrame(s, env.walPiece.jobId, (job) => this.walPiece(job, env.walPiece));
      case 'jobResult':
        return this.onJobFrame(s, env.jobResult.jobId, async (job) => this.jobResult(job, env.jobResult));
      case 'jobProgress': {
        const job = this.ownJob(s, env.jobProgress.jobId);
        if (!job) return;
        job.lastActivity = Date.now();
        // A heartbeat only says the agent still works on the job (quiesce, snapshot, release).
        if (env.jobProgress.phase !== 'heartbeat') job.progress(env.jobProgress);
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
      case 'mountRequest':
      case 'mountRelease':
      case 'walFetch':
      case 'mountResult':
        if (!this.mountFrames) {
          const id = env.kind === 'mountRequest' ? env.mountRequest.requestId : env.kind === 'mountResult' ? env.mountResult.requestId
            : env.kind === 'walFetch' ? env.walFetch.mountId : env.mountRelease.mountId;
          return s.send(envelope('error', { jobId: id, code: 'E_NOT_FOUND', message: 'this appliance does not serve NBD mounts' }));
        }
        return this.mountFrames(s, env);
      case 'restoreRequest':
      case 'restoreWant':
      case 'restoreAck':
      case 'restoreEnd':
        return this.restores.onFrame({ id: s.id, agentName: s.agent!.name, send: (e) => s.transport.send(e) }, env);
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
    if (!job.members.includes(b.volume)) {
      throw new BlocksnapError('E_PROTOCOL', `job ${job.id} is for ${job.group ? `group ${job.volume} (${job.members.join(', ')})` : `volume ${job.volume}`}, not ${b.volume}`);
    }
    if (job.state !== 'dispatched' && job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id} cannot ${b.resume ? 'resume' : 'begin a volume'} in state ${job.state}`);
    if (job.graceTimer) clearTimeout(job.graceTimer);
    job.graceTimer = null;
    job.sessionId = s.id;
    const t = job.transfers.get(b.volume);
    if (b.resume && t) {
      if (job.current !== t) throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: ${b.volume} is not the volume being transferred`);
      if (t.ended) {
        // The member ended before the connection dropped: nothing more to receive.
        s.send(envelope('volumeReady', { jobId: job.id, basisAccepted: t.basisAccepted, resumeFrom: t.ingest.chunkCount, reason: '' }));
        return;
      }
      await t.ingest.flush();
      t.ingest.resumed();
      t.resumes++;
      this.log.info({ job: job.id, volume: b.volume, resumeFrom: t.ingest.durableNext }, 'transfer resumed');
      s.send(envelope('volumeReady', { jobId: job.id, basisAccepted: t.basisAccepted, resumeFrom: t.ingest.durableNext, reason: '' }));
      return;
    }
    if (t) throw new BlocksnapError('E_PROTOCOL', `job ${job.id} already began volume ${b.volume}`);
    // A member begins after the previous one ended (one open ingest per job). A resume of a
    // member never begun is its first begin whose VolumeReady the dropped connection lost.
    if (job.current && !job.current.ended) {
      throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: ${b.resume ? 'resume' : 'begin'} of ${b.volume} while ${job.current.volume} has not ended`);
    }
    if (b.resume && !job.group) throw new BlocksnapError('E_PROTOCOL', `job ${job.id} has no transfer to resume`);
    const vol = this.catalog.upsertVolume(job.agentId, b.volume, b.volumeSize, b.chunkSize);
    const { mode, basis, reason } = decideBasis({ ...b, incremental: b.mode === JobMode.INCREMENTAL }, this.catalog.lastImage(vol.id));
    const basisAccepted = basis !== null;
    const ingest = await Ingest.open(this.store, {
      jobId: job.id, volumeSize: b.volumeSize, chunkSize: b.chunkSize, mode,
      basisRootDigest: basis ? Buffer.from(basis.rootDigest, 'hex') : undefined,
      flushEveryBytes: this.opts.flushEveryBytes, startSeq: job.current?.ingest.seq ?? 0,
    }, this.log);
    if (b.resume) ingest.resumed();
    const t2 = { volume: b.volume, ingest, volumeId: vol.id, basisAccepted, basisImageId: basis?.id ?? null, resumes: 0, ended: null };
    job.transfers.set(b.volume, t2);
    job.current = t2;
    job.state = 'transferring';
    if (!job.group) this.catalog.setJobState(job.id, 'running', { volumeId: vol.id, kind: mode });
    if (reason) this.log.info({ job: job.id, volume: b.volume, reason }, 'basis refused: the volume is sent as a full');
    s.send(envelope('volumeReady', { jobId: job.id, basisAccepted, resumeFrom: 0, reason }));
  }

  private async chunkBatch(s: AgentSession, job: ActiveJob, b: ChunkBatch): Promise<void> {
    if (!job.ingest || job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: chunks before begin`);
    if (job.current!.ended) throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: chunks after ${job.current!.volume} ended`);
    // Every batch is the next one (Ingest.addBatch): a duplicate or out-of-order batch aborts the job.
    // Only the first batch after a declared resume may skip numbers (the ones lost with the connection).
    await job.ingest.addBatch(b.seq, b.chunks);
    s.send(envelope('ack', { jobId: job.id, seq: b.seq, durableNext: job.ingest.durableNext }));
  }

  private async walPiece(job: ActiveJob, w: WalPiece): Promise<void> {
    if (!job.ingest || job.state !== 'transferring' || !job.wal.hasInfo) {
      throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: WAL before the PostgreSQL backup info`);
    }
    if (job.current!.ended) return; // resent after a resume: every piece arrived before the member ended
    if (!job.wal.accept(job.id, w)) return;
    const { zero } = await job.ingest.putExtra(`WAL ${w.fileName}@${w.offset}`, w.digest, w.data, w.plainLength);
    job.wal.stored(w, zero);
  }

  /** The commit's context for this job (../jobs/image-commit.ts). */
  private commitContext(job: ActiveJob): CommitContext {
    return { catalog: this.catalog, manifests: this.opts.manifests, log: this.log, agent: job.agent, jobId: job.id, pg: job.wal.pgInfo() };
  }

  private async endVolume(s: AgentSession, job: ActiveJob, e: EndVolume): Promise<void> {
    const t = job.current;
    if (!t || job.state !== 'transferring') throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: end before begin`);
    if (t.ended) return; // resent after a resume
    const ingest = t.ingest;
    const { rootDigest } = await ingest.finish(e.nextIndex, e.expectedRoot);
    const st = ingest.stats;
    const agentStats = e.stats;
    const stats: ManifestStats = {
      chunksTotal: ingest.chunkCount, chunksReceived: st.chunksReceived, chunksZero: st.chunksZero,
      chunksStored: st.chunksStored, bytesReceived: st.bytesReceived, bytesStored: st.bytesStored,
      pagesWritten: st.pagesWritten, pagesShared: st.pagesShared, resumes: t.resumes,
      chunksRead: agentStats?.chunksRead ?? 0, bytesRead: agentStats?.bytesRead ?? 0,
      freezeSeconds: agentStats?.freezeSeconds ?? 0,
    };
    t.ended = { rootDigest, stats, agentStats };
    // A group member's map is durable now; its manifest waits for CommitSet.
    if (job.group) return;
    const m = await commitImage(this.commitContext(job), sealed(t));
    job.imageId = m.imageId;
    job.state = 'committed';
    this.catalog.finishJob(job.id, { state: 'committed', imageId: m.imageId, stats: { ...agentStats, ...stats, ...job.wal.windows() } });
    const wire: TransferStats = {
      ...(agentStats ?? emptyTransferStats()), bytesStored: st.bytesStored, chunksStored: st.chunksStored,
    };
    s.send(envelope('committed', { jobId: job.id, imageId: m.imageId, stats: wire }));
  }

  /**
   * Commits a group job's image set (DESIGN.md §5): every member ended (its
   * map durable), then every member's manifest, each naming the whole set
   * (the set is visible only when all exist: roll-forward deletes the rest
   * after a crash), then all catalog rows in one transaction, then Committed.
   */
  private async commitSet(s: AgentSession, job: ActiveJob): Promise<void> {
    if (!job.group) throw new BlocksnapError('E_PROTOCOL', `job ${job.id} is not a group job: it commits at EndVolume`);
    if (job.state === 'committed') return this.sendCommitted(s, job); // resent after a resume
    const open = job.members.filter((v) => !job.transfers.get(v)?.ended);
    if (job.state !== 'transferring' || open.length) {
      throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: CommitSet before ${open.join(', ')} ended`);
    }
    const transfers = job.members.map((v) => job.transfers.get(v)!);
    const { setId, manifests } = await commitImageSet(this.commitContext(job), transfers.map(sealed));
    job.setId = setId;
    job.images = manifests.map((m) => ({ volume: m.volume, imageId: m.imageId }));
    job.imageId = job.images[0]!.imageId;
    job.state = 'committed';
    const kind = transfers.every((t) => t.ingest.params.mode === 'incremental') ? 'incremental' : 'full';
    this.catalog.setJobState(job.id, 'running', { kind });
    this.catalog.finishJob(job.id, { state: 'committed', imageId: job.imageId, stats: { ...this.groupStats(job), ...job.wal.windows(), setId, images: job.images } });
    this.sendCommitted(s, job);
  }

  private groupStats(job: ActiveJob): Record<string, number> {
    const out: Record<string, number> = {};
    for (const t of job.transfers.values()) {
      for (const [k, v] of Object.entries(t.ended?.stats ?? {})) out[k] = k === 'freezeSeconds' ? Math.max(out[k] ?? 0, v) : (out[k] ?? 0) + v;
    }
    return out;
  }

  private sendCommitted(s: AgentSession, job: ActiveJob): void {
    let agentStats: TransferStats | undefined;
    let bytesStored = 0;
    let chunksStored = 0;
    for (const t of job.transfers.values()) {
      agentStats ??= t.ended?.agentStats;
      bytesStored += t.ingest.stats.bytesStored;
      chunksStored += t.ingest.stats.chunksStored;
    }
    const wire: TransferStats = { ...(agentStats ?? emptyTransferStats()), bytesStored, chunksStored };
    s.send(envelope('committed', { jobId: job.id, imageId: job.imageId!, stats: wire, setId: job.setId!, images: job.images }));
  }

  private async jobResult(job: ActiveJob, r: JobResult): Promise<void> {
    if (r.ok) {
      if (job.state !== 'committed' || r.imageId !== job.imageId) {
        throw new BlocksnapError('E_PROTOCOL', `job ${job.id}: success reported for image ${r.imageId} that was not committed`);
      }
      let bytesStored = 0;
      let chunksStored = 0;
      for (const t of job.transfers.values()) {
        bytesStored += t.ingest.stats.bytesStored;
        chunksStored += t.ingest.stats.chunksStored;
      }
      const merged = { ...this.catalog.job(job.id)?.stats, ...r.stats, bytesStored, chunksStored };
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
    // After any frame still being processed, so a writer is not aborted mid-put. An ended
    // member's packs are durable but unreferenced: garbage, like any uncommitted job's.
    const ingests = [...job.transfers.values()].map((t) => t.ingest);
    if (ingests.length) job.chain = job.chain.then(async () => {
      for (const i of ingests) await i.abort();
    }).catch(() => undefined);
    const state = err.code === 'E_CANCELLED' ? 'cancelled' : 'failed';
    this.catalog.finishJob(job.id, { state, errorCode: err.code, errorMessage: err.message });
    this.finish(job, { ok: false, jobId: job.id, errorCode: err.code, errorMessage: err.message });
  }

  private sessionOf(job: ActiveJob): AgentSession | undefined {
    const s = this.sessions.get(job.agent);
    return s && s.id === job.sessionId ? s : undefined;
  }

  async shutdown(): Promise<void> {
    clearInterval(this.idleTimer);
    this.restores.close();
    for (const job of this.jobs.values()) this.fail(job, new BlocksnapError('E_CANCELLED', 'appliance shutting down'));
  }
}

/** A member whose map is sealed (EndVolume passed), as the commit needs it. */
function sealed(t: MemberTransfer): SealedMember {
  const p = t.ingest.params;
  return {
    volume: t.volume, volumeSize: p.volumeSize, chunkSize: p.chunkSize, kind: p.mode, basisImageId: t.basisImageId,
    rootDigest: t.ended!.rootDigest, stats: t.ended!.stats,
  };
}

function asCode(code: string): BlocksnapError['code'] {
  return (code && /^E_[A-Z_]+$/.test(code) ? code : 'E_INTERNAL') as BlocksnapError['code'];
}
