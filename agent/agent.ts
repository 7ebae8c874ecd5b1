import { randomBytes } from 'node:crypto';
import { stat } from 'node:fs/promises';
import type { Logger } from 'pino';
import { BlocksnapError, isBlocksnapError, toBlocksnapError } from '../proto/errors.js';
import { envelope, PROTOCOL_VERSION, type Envelope, type RunJob, type VolumeInfo } from '../proto/messages.js';
import { validateEnvelope } from '../proto/codec.js';
import { ScramClient, type ScramKeys } from '../proto/scram.js';
import type { Transport } from '../proto/transport.js';
import { checkApplianceUrl } from '../proto/ws-transport.js';
import type { AgentConfig } from './config.js';
import { JobRunner, type JobTarget } from './job-runner.js';
import { digestMapPath } from './state/digest-map.js';
import type { SnapshotProvider, VolumeSpec } from './snapshot/snapshot-provider.js';
import { proveVolumes } from './snapshot/volume-identity.js';
import { DigestMap } from './state/digest-map.js';
import { VolumeTracking } from './cbt/volume-tracking.js';
import { reconnectDelayMs } from './reconnect-backoff.js';
import type { AgentPorts } from './ports.js';
import { runAudit, type AuditResult } from './audit/audit-run.js';
import { AgentControlServer, type AgentStatus, type ControlledAgent } from './control-server.js';
import { AgentMounts } from './agent-mounts.js';
import { runRestore, type RestoreProgress, type RestoreRequestOptions, type RestoreResult } from './restore/restore-run.js';
import { RestoreSession } from './restore/restore-session.js';

export const AGENT_VERSION = '0.1.0';

export interface AgentHooks {
  onFatal?: (e: BlocksnapError) => void;
}

/**
 * The agent process: dials the appliance, authenticates, announces its
 * volumes and runs the jobs the appliance sends. The connection is redialled
 * with backoff when it drops; running jobs survive and resume on the new
 * connection. At start, it releases what an earlier (killed) run left:
 * snapshots and a filesystem left frozen. Its snapshot provider, tracker,
 * quiescer and dialer are ports (ports.ts) composed by the caller
 * (compose.ts): nothing here constructs one.
 */
export class Agent implements ControlledAgent {
  private transport: Transport | null = null;
  private readonly runners = new Map<string, JobRunner>();
  private connectedWaiters: { resolve: () => void; reject: (e: BlocksnapError) => void }[] = [];
  private stopped = false;
  private loop: Promise<void> | null = null;
  private wake: (() => void) | null = null;
  /** Fatal session error (bad credential): the agent stops instead of hammering the appliance. */
  fatal: BlocksnapError | null = null;

  private readonly provider: SnapshotProvider;

  constructor(
    readonly config: AgentConfig,
    private readonly ports: AgentPorts,
    private readonly log: Logger,
    private readonly hooks: AgentHooks = {},
  ) {
    this.provider = ports.provider;
    this.mounts = new AgentMounts({
      mounter: ports.mounter ?? null, applianceUrl: config.appliance, send: (e) => this.send(e), waitConnected: (ms) => this.waitConnected(ms), log,
    });
  }

  /** Instant mounts of images on this host (DESIGN.md §4.5; the LocalMounter port does the local steps). */
  readonly mounts: AgentMounts;

  async start(): Promise<void> {
    // Plain ws:// to another host is refused before anything starts (E_CONFIG), unless the operator said insecure.
    checkApplianceUrl(this.config.appliance, this.config.insecure);
    // First: a live agent on the same state directory answers there (E_BUSY) before anything of its is released.
    this.control = await AgentControlServer.listen(this.config.stateDir, this, this.log).catch((e) => {
      if (isBlocksnapError(e, 'E_BUSY')) throw e;
      this.log.error({ err: e }, 'no control socket: `blocksnap-agent audit/status` cannot reach this agent');
      return null;
    });
    try {
      const released = await this.provider.cleanupStale();
      if (released.length) this.log.warn({ released }, 'released resources left by an earlier run');
      if (this.ports.quiescer) await this.releasePostgres();
      // Mounts a killed earlier run left (FUSE, loop, filesystem, postmaster): released before anything new.
      await this.mounts.cleanupOrphans().catch((e) => this.log.error({ err: e }, 'cannot release the mounts an earlier run left'));
      await this.volumeInfos(); // a missing image or device: E_CONFIG now (exit 2), not a redial loop
      // Refuse a configuration whose device, image and mountpoint are not one volume (DESIGN.md §7.3).
      await proveVolumes(this.provider, this.config.volumes);
      if (this.ports.tracker) await this.startTracking();
    } catch (e) {
      await this.control?.close();
      this.control = null;
      throw e;
    }
    this.loop = this.connectLoop();
  }

  /** Resumes replay / stops an exclusive backup that a killed earlier run left held. */
  private async releasePostgres(): Promise<void> {
    try {
      const r = await this.ports.quiescer!.releaseStale();
      if (r.found) this.log.warn({ actions: r.actions }, 'released what an earlier run left held in PostgreSQL');
    } catch (e) {
      // Not fatal for the agent: jobs refuse to quiesce while a stale record exists (E_BUSY) and say why.
      this.log.error({ err: toBlocksnapError(e, 'E_PG') }, 'cannot release stale PostgreSQL state');
    }
  }

  /**
   * Starts a kernel write tracker per volume. A volume whose tracker cannot
   * start is backed up by digest comparison (slower, never wrong); the job
   * results say why.
   */
  private async startTracking(): Promise<void> {
    const trackers = this.ports.tracker!;
    const stale = await trackers.cleanupStale().catch((e) => {
      this.log.warn({ err: e, tracker: trackers.kind }, 'cannot sweep what earlier trackers left');
      return [] as string[];
    });
    if (stale.length) this.log.warn({ tracker: trackers.kind, instances: stale }, 'removed tracker resources left by an earlier run');
    for (const v of this.config.volumes) {
      try {
        this.tracking.set(v.name, await VolumeTracking.open(v, this.config.stateDir, trackers.create(v), this.log));
      } catch (e) {
        this.log.error({ volume: v.name, err: toBlocksnapError(e, 'E_TRACKER') }, 'cannot track volume; incrementals will compare digests');
      }
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.control?.close();
    this.control = null;
    const stopping = new BlocksnapError('E_CANCELLED', 'agent stopping');
    for (const a of this.audits.values()) a.abort(stopping);
    // Mounts go while the connection is up, so the appliance ends them (MountRelease) and drops their overlays.
    await this.mounts.unmountAll();
    for (const r of this.restores.values()) r.fail(stopping);
    // Jobs are cancelled while the connection is still up: each releases its snapshot, gives the
    // changes it took back to the tracker and tells the appliance (E_CANCELLED), which then fails
    // the job at once instead of holding it for a resume that will never come.
    for (const r of this.runners.values()) r.cancel('agent stopping');
    for (const w of this.connectedWaiters.splice(0)) w.reject(stopping);
    await Promise.allSettled([...this.running]);
    this.wake?.();
    this.transport?.close();
    await this.loop;
    // A clean stop saves each bitmap with the clean-shutdown flag: the next start may trust it.
    for (const [name, t] of this.tracking) {
      await t.close().catch((e) => this.log.error({ volume: name, err: e }, 'tracker stop failed'));
    }
    this.tracking.clear();
  }

  private readonly running = new Set<Promise<unknown>>();
  private readonly tracking = new Map<string, VolumeTracking>();
  private control: AgentControlServer | null = null;
  /** Restores in progress by request id (their wire exchange), and the configured volumes they hold (DESIGN.md §4.6). */
  private readonly restores = new Map<string, RestoreSession>();
  private readonly restoring = new Set<string>();
  /** Volumes held by an audit (control socket), with its cancel switch. */
  private readonly audits = new Map<string, AbortController>();
  /** SCRAM keys derived from the token (PBKDF2 once per salt, not per reconnect). */
  private readonly scramKeys = new Map<string, ScramKeys>();
  /** Tells the appliance that jobs of an earlier process of this agent will never resume. */
  private readonly instanceId = newInstanceId();

  get connected(): boolean {
    return this.transport !== null;
  }

  private async connectLoop(): Promise<void> {
    let attempt = 0;
    while (!this.stopped) {
      let t: Transport | null = null;
      try {
        // Before dialling: an unreadable volume is a configuration error, not a network one.
        const volumes = await this.volumeInfos();
        t = await this.ports.dial(this.config.appliance, { ca: this.config.ca, insecure: this.config.insecure });
        const closed = new Promise<BlocksnapError | undefined>((resolve) => t!.onClose(resolve));
        await this.handshake(t, volumes);
        attempt = 0;
        const err = await closed;
        this.transport = null;
        for (const r of this.runners.values()) r.disconnected();
        this.mounts.disconnected();
        for (const r of this.restores.values()) r.fail(new BlocksnapError('E_DISCONNECTED', 'the connection to the appliance was lost during the restore'));
        if (!this.stopped) this.log.warn({ err: err?.code, message: err?.message }, 'connection to appliance closed');
      } catch (e) {
        // A failed handshake closes its socket now, not when the appliance's auth timeout does.
        t?.close();
        const err = toBlocksnapError(e);
        if (err.code === 'E_AUTH' || err.code === 'E_PROTOCOL' || err.code === 'E_CONFIG') {
          this.fatal = err;
          this.log.error({ code: err.code, message: err.message }, err.code === 'E_CONFIG' ? 'configuration error; stopping' : 'appliance refused this agent; stopping');
          this.hooks.onFatal?.(err);
          return;
        }
        this.log.warn({ code: err.code, message: err.message, attempt }, 'cannot reach appliance');
      }
      if (this.stopped) break;
      const delay = reconnectDelayMs(attempt++, { baseMs: 200, maxMs: this.config.reconnectMaxMs });
      this.log.debug({ retryMs: delay }, 'redialling');
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, delay).unref();
      });
    }
  }

  /** The provider knows the size of the volumes it snapshots; else the image file's or the device's. */
  private volumeSize(v: VolumeSpec): Promise<number> {
    return this.provider.volumeSize ? this.provider.volumeSize(v) : fileOrDeviceSize(v.image ?? v.device);
  }

  /** What the Hello announces. A volume whose image or device cannot be opened is a configuration error (E_CONFIG). */
  private async volumeInfos(): Promise<VolumeInfo[]> {
    const volumes: VolumeInfo[] = [];
    for (const v of this.config.volumes) {
      const path = v.image ?? v.device;
      const size = await this.volumeSize(v).catch((e) => {
        throw new BlocksnapError('E_CONFIG', `volume ${v.name}: ${v.image ? 'image' : 'device'} ${path}: ${(e as Error).message}`, { cause: e });
      });
      const map = await DigestMap.readIfValid(digestMapPath(this.config.stateDir, v.name));
      volumes.push({ name: v.name, size, chunkSize: v.chunkSize, lastImageId: map?.imageId ?? '' });
    }
    return volumes;
  }

  private async handshake(t: Transport, volumes: VolumeInfo[]): Promise<void> {
    // SCRAM (DESIGN.md §4.2): the token never crosses the wire; Welcome must carry the appliance's proof.
    const scram = new ScramClient(this.config.agent, this.config.token, PROTOCOL_VERSION, this.scramKeys);
    const welcome = new Promise<void>((resolve, reject) => {
      t.onMessage((env) => {
        if (!this.transport && (env.kind === 'authChallenge' || env.kind === 'welcome')) {
          try {
            validateEnvelope(env);
            if (env.kind === 'welcome') scram.checkWelcome(env.welcome);
          } catch (e) {
            return reject(toBlocksnapError(e, 'E_PROTOCOL'));
          }
          if (env.kind === 'authChallenge') {
            scram.proof(env.authChallenge).then((p) => t.send(envelope('authProof', p))).catch((e) => reject(toBlocksnapError(e)));
            return;
          }
        }
        if (env.kind === 'welcome') {
          this.transport = t;
          this.log.info({ session: env.welcome.sessionId }, 'connected to appliance');
          for (const w of this.connectedWaiters.splice(0)) w.resolve();
          resolve();
        } else if (env.kind === 'error' && !env.error.jobId && !this.transport) {
          reject(new BlocksnapError(env.error.code === 'E_AUTH' ? 'E_AUTH' : 'E_PROTOCOL', `appliance: ${env.error.message}`));
        } else {
          this.onEnvelope(env);
        }
      });
      t.onClose((err) => reject(err ?? new BlocksnapError('E_DISCONNECTED', 'closed during handshake')));
    });
    await t.send(envelope('hello', {
      agent: this.config.agent, clientNonce: scram.clientNonce, protocolVersion: PROTOCOL_VERSION, agentVersion: AGENT_VERSION, volumes, instanceId: this.instanceId,
      groups: this.config.groups.map((g) => ({ name: g.name, volumes: [...g.volumes] })),
    }));
    await welcome;
  }

  private onEnvelope(env: Envelope): void {
    switch (env.kind) {
      case 'runJob':
        return this.startJob(env.runJob);
      case 'ping':
        void this.send(envelope('pong', env.ping)).catch(() => undefined);
        return;
      case 'ack':
      case 'volumeReady':
      case 'committed':
      case 'cancelJob':
      case 'error': {
        const jobId = (env as any)[env.kind].jobId as string;
        const r = this.runners.get(jobId);
        if (r) r.deliver(env);
        else if (env.kind === 'error' && this.mounts.deliver(env)) return;
        else if (env.kind === 'error') this.log.warn({ code: env.error.code, message: env.error.message }, 'appliance error');
        return;
      }
      case 'mountGranted':
      case 'walPiece':
      case 'runMount':
      case 'mountRelease':
        this.mounts.deliver(env);
        return;
      case 'restoreMap':
      case 'restoreChunks':
      case 'restoreEnd':
        this.restores.get((env as any)[env.kind].requestId as string)?.deliver(env);
        return;
      default:
        this.log.warn({ kind: env.kind }, 'unexpected frame from appliance');
    }
  }

  private startJob(job: RunJob): void {
    const refuse = (code: BlocksnapError['code'], message: string) =>
      void this.send(envelope('jobResult', { jobId: job.jobId, ok: false, imageId: '', errorCode: code, errorMessage: message })).catch(() => undefined);
    let target: JobTarget;
    try {
      target = this.targetOf(job.volume);
    } catch (e) {
      const err = toBlocksnapError(e);
      return refuse(err.code, err.message);
    }
    for (const v of target.volumes) {
      const holder = this.holderOf(v.name);
      if (holder) return refuse('E_BUSY', `${v.name} is busy: ${holder} is running on it`);
    }
    const runner = new JobRunner({
      stateDir: this.config.stateDir, provider: this.provider, log: this.log, windowBytes: this.config.windowBytes,
      batchBytes: this.config.batchBytes, workers: this.config.workers, compressionLevel: this.config.compressionLevel, send: (e) => this.send(e),
      waitConnected: (ms) => this.waitConnected(ms), resumeTimeoutMs: 5 * 60_000, replyTimeoutMs: 60_000,
      trackingOf: (name) => this.tracking.get(name), postgres: this.config.postgres, quiescer: this.ports.quiescer?.factory,
    }, job, target);
    this.runners.set(job.jobId, runner);
    const p = runner.run().finally(() => {
      this.runners.delete(job.jobId);
      this.running.delete(p);
    });
    this.running.add(p);
  }

  /**
   * What a job name means: a group (all its members, one image set) or a
   * lone volume. A member of a group alone is refused: its image would not
   * be consistent with the other members' (DESIGN.md §4.4).
   */
  private targetOf(name: string): JobTarget {
    const group = this.config.groups.find((g) => g.name === name);
    if (group) {
      return { group: group.name, volumes: group.volumes.map((n) => this.config.volumes.find((v) => v.name === n)!) };
    }
    const volume = this.config.volumes.find((v) => v.name === name);
    if (!volume) throw new BlocksnapError('E_UNKNOWN_VOLUME', `no volume or group ${name} on agent ${this.config.agent}`);
    const owner = this.config.groups.find((g) => g.volumes.includes(name));
    if (owner) throw new BlocksnapError('E_USAGE', `volume ${name} is a member of consistency group ${owner.name}: back up group ${owner.name} instead`);
    return { volumes: [volume] };
  }

  /** What holds a volume exclusively now (DESIGN.md §4.3), or null. */
  private holderOf(volume: string): string | null {
    if (this.audits.has(volume)) return 'an audit';
    if (this.restoring.has(volume)) return 'a restore';
    for (const r of this.runners.values()) if (!r.released && r.volumeNames.includes(volume)) return `job ${r.jobId}`;
    return null;
  }

  /** Audits the volume's tracker against a full comparison (audit-run.ts); holds the volume meanwhile. */
  async auditVolume(name: string, signal?: AbortSignal): Promise<AuditResult> {
    const volume = this.config.volumes.find((v) => v.name === name);
    if (!volume) throw new BlocksnapError('E_UNKNOWN_VOLUME', `no volume ${name} on agent ${this.config.agent} (configured: ${this.config.volumes.map((v) => v.name).join(', ') || 'none'})`);
    if (this.stopped) throw new BlocksnapError('E_CANCELLED', 'agent stopping');
    if (!this.loop) throw new BlocksnapError('E_BUSY', 'agent is still starting');
    const holder = this.holderOf(name);
    if (holder) throw new BlocksnapError('E_BUSY', `${name} is busy: ${holder} is running on it`);
    const abort = new AbortController();
    signal?.addEventListener('abort', () => abort.abort(signal.reason), { once: true });
    this.audits.set(name, abort);
    const p = runAudit({
      volume, stateDir: this.config.stateDir, provider: this.provider, tracking: this.tracking.get(name),
      workers: this.config.workers, log: this.log, signal: abort.signal,
    }).finally(() => {
      this.audits.delete(name);
      this.running.delete(p);
    });
    this.running.add(p);
    return p;
  }

  /** Restores an image of this agent onto a device or file (restore/restore-run.ts), over the appliance session. */
  async restoreImage(req: RestoreRequestOptions, signal?: AbortSignal, onProgress?: (p: RestoreProgress) => void): Promise<RestoreResult> {
    if (this.stopped) throw new BlocksnapError('E_CANCELLED', 'agent stopping');
    // A restore needs the session: wait for a redial in progress, not longer.
    await this.waitConnected(15_000).catch((e) => {
      throw new BlocksnapError('E_DISCONNECTED', `not connected to the appliance: a restore needs it (${(e as Error).message})`, { cause: e });
    });
    const p = runRestore(req, {
      volumes: this.config.volumes, stateDir: this.config.stateDir, workers: this.config.workers, log: this.log, signal, onProgress,
      trackingOf: (name) => this.tracking.get(name),
      hold: (name) => {
        const holder = this.holderOf(name);
        if (holder) throw new BlocksnapError('E_BUSY', `${name} is busy: ${holder} is running on it`);
        this.restoring.add(name);
        return () => this.restoring.delete(name);
      },
      openSession: (id) => {
        const s = new RestoreSession(id, (e) => this.send(e));
        this.restores.set(id, s);
        return s;
      },
      closeSession: (id) => this.restores.delete(id),
    }).finally(() => this.running.delete(p));
    this.running.add(p);
    return p;
  }

  status(): AgentStatus {
    return {
      agent: this.config.agent, version: AGENT_VERSION, pid: process.pid, connected: this.connected, trackingMode: this.config.tracking,
      volumes: this.config.volumes.map((v) => {
        const t = this.tracking.get(v.name);
        return {
          name: v.name, device: v.device, mountpoint: v.mountpoint, chunkSize: v.chunkSize, busy: this.holderOf(v.name),
          tracking: t ? { validity: t.validity(), generation: t.tracker.generation, basisImageId: t.basisImageId } : null,
        };
      }),
    };
  }

  send(env: Envelope): Promise<void> {
    if (!this.transport) return Promise.reject(new BlocksnapError('E_DISCONNECTED', 'not connected to the appliance'));
    return this.transport.send(env);
  }

  waitConnected(timeoutMs: number): Promise<void> {
    if (this.transport) return Promise.resolve();
    if (this.stopped) return Promise.reject(new BlocksnapError('E_CANCELLED', 'agent stopping'));
    return new Promise((resolve, reject) => {
      const w = {
        resolve: () => {
          clearTimeout(timer);
          resolve();
        },
        reject: (e: BlocksnapError) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        this.connectedWaiters = this.connectedWaiters.filter((x) => x !== w);
        reject(new BlocksnapError('E_TIMEOUT', `appliance not reachable within ${timeoutMs} ms`));
      }, timeoutMs);
      this.connectedWaiters.push(w);
    });
  }
}

async function fileOrDeviceSize(path: string): Promise<number> {
  const s = await stat(path);
  if (s.isFile()) return s.size;
  const { FileBlockDevice } = await import('./blockdev/file-block-device.js');
  const d = await FileBlockDevice.open(path);
  const size = d.size;
  await d.close();
  return size;
}

export const newInstanceId = () => randomBytes(8).toString('hex');
