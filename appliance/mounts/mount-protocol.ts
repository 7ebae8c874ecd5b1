/**
 * The appliance's side of the instant-mount messages (DESIGN.md §4.5):
 * MountRequest → MountGranted | Error{request}, MountRelease (either way),
 * WalFetch → WalPiece* | Error{mount}, and RunMount → MountResult for the
 * appliance-triggered mount (`blocksnap-appliance mount IMAGE --on AGENT`).
 *
 * Who may mount what: an agent may mount the images it backed up itself
 * (its own volumes'). Another agent's image only through RunMount: the
 * operator named the agent with --on, and the agent's MountRequest carries
 * that RunMount's request id for that image. A refusal does not say whether
 * the image exists (E_NOT_FOUND either way).
 */
import { createHash, randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import {
  envelope, type Envelope, type MountExport, type MountRequest, type MountResult, type RunMount, type WalFetch,
} from '../../proto/messages.js';
import { zstdCompress } from '../../proto/shared/zstd.js';
import type { Transport } from '../../proto/transport.js';
import type { AgentRow } from '../catalog/catalog.js';
import type { ChunkStore } from '../store/chunk-store.js';
import type { MountImage } from './mount-backend.js';
import type { MountRow } from './mount-catalog.js';
import type { MountManager } from './mount-manager.js';

/** What the protocol needs of an agent session (AgentSession gives it). */
export interface MountPeer {
  readonly id: string;
  readonly agent: AgentRow | null;
  /** The remote IP of the agent's connection: its NBD connections must come from there. */
  readonly address: string;
  readonly transport: Transport;
  /** Hello.instance_id: random per agent process. */
  readonly instanceId: string;
}

export interface NbdEndpoint {
  port: number;
  tls: boolean;
}

/** WAL fetches one mount may have queued at once (each is one segment, sent piece by piece). */
const MAX_WAL_FETCHES_QUEUED = 4;
/** RunMount requests in flight, all agents. */
const MAX_RUNS = 64;

interface PendingRun {
  agent: string;
  imageId: string;
  settle: (r: MountResult) => void;
}

export class MountProtocol {
  private readonly runs = new Map<string, PendingRun>();
  private readonly walQueues = new Map<string, { chain: Promise<void>; queued: number }>();
  /** Mounts the agent itself released: no MountRelease goes back. */
  private readonly releasedByAgent = new Set<string>();
  /** The agent process (instance id) each live mount was granted to. */
  private readonly grantedTo = new Map<string, string>();
  /** Mounts the operator removes, waiting for their agent to unmount first (removeGracefully). */
  private readonly awaitingRelease = new Map<string, { reason: string; done: () => void }>();

  constructor(
    private readonly manager: MountManager,
    private readonly store: ChunkStore,
    private readonly endpoint: () => NbdEndpoint | null,
    private readonly sessionOf: (agent: string) => MountPeer | undefined,
    private readonly log: Logger,
  ) {}

  /** An instant-mount frame from an authenticated agent (already shape-checked by validateEnvelope). */
  onFrame(s: MountPeer, env: Envelope): void {
    switch (env.kind) {
      case 'mountRequest':
        return void this.grant(s, env.mountRequest).catch((e) => this.refuse(s, env.mountRequest.requestId, e));
      case 'mountRelease':
        return void this.release(s, env.mountRelease.mountId).catch((e) => this.refuse(s, env.mountRelease.mountId, e));
      case 'walFetch':
        return this.walFetch(s, env.walFetch);
      case 'mountResult': {
        const r = env.mountResult;
        const run = this.runs.get(r.requestId);
        if (!run || run.agent !== s.agent!.name) return this.refuse(s, r.requestId, new BlocksnapError('E_NOT_FOUND', `no mount request ${r.requestId} for this agent`));
        return run.settle(r);
      }
      default:
        throw new BlocksnapError('E_PROTOCOL', `not a mount frame: ${env.kind}`);
    }
  }

  private refuse(s: MountPeer, id: string, e: unknown): void {
    const err = toBlocksnapError(e);
    this.log.info({ agent: s.agent?.name, id, code: err.code, message: err.message }, 'mount request refused');
    s.transport.send(envelope('error', { jobId: id, code: err.code, message: err.message })).catch(() => undefined);
  }

  private async grant(s: MountPeer, req: MountRequest): Promise<void> {
    const nbd = this.endpoint();
    if (!nbd) throw new BlocksnapError('E_NOT_FOUND', 'this appliance does not serve NBD');
    const agent = s.agent!;
    const run = this.runs.get(req.requestId);
    const operator = !!run && run.agent === agent.name && run.imageId === req.imageId;
    const images = this.manager.imagesOf(req.imageId);
    if (!operator && images.some((i) => i.agent !== agent.name)) {
      // Not the agent's own image, and no operator asked for it: as if it did not exist.
      throw new BlocksnapError('E_NOT_FOUND', `no image or image set ${req.imageId} of agent ${agent.name} (another agent's image is mounted with \`blocksnap-appliance mount IMAGE --on ${agent.name}\`)`);
    }
    const row = await this.manager.create({
      imageRef: req.imageId, agent, peerAddress: s.address, writable: req.writable, ttlSeconds: req.ttlSeconds,
      requestedBy: operator ? 'operator' : 'agent',
    });
    this.grantedTo.set(row.id, s.instanceId);
    const members = this.manager.imagesOfMount(row.id)!;
    const exports: MountExport[] = row.exports.map((x) => exportOf(x, members.find((m) => m.imageId === x.imageId)!));
    await s.transport.send(envelope('mountGranted', {
      requestId: req.requestId, mountId: row.id, nbdPort: nbd.port, tls: nbd.tls, exports, imageId: row.imageRef,
      writable: row.writable, expiresAt: row.expiresAt ?? '',
    }));
  }

  private async release(s: MountPeer, mountId: string): Promise<void> {
    const row = this.manager.mounts.get(mountId);
    if (!row || row.agentId !== s.agent!.id) throw new BlocksnapError('E_NOT_FOUND', `no mount ${mountId} of agent ${s.agent!.name}`);
    // Released twice, or ended meanwhile: nothing to do but the acknowledgement.
    if (row.state === 'active') {
      const asked = this.awaitingRelease.get(mountId);
      this.releasedByAgent.add(mountId);
      try {
        await this.manager.remove(mountId, asked?.reason ?? 'released by the agent');
      } finally {
        this.releasedByAgent.delete(mountId);
        asked?.done();
      }
    }
    // The agent's `unmount` returns once the mount is ended here (its overlay gone): MountRelease back acknowledges.
    await s.transport.send(envelope('mountRelease', { mountId, reason: 'released' })).catch(() => undefined);
  }

  /**
   * The operator's removal: the agent is asked to unmount first (MountRelease),
   * so its PostgreSQL stops and its filesystems unmount while the export
   * still answers; its MountRelease back ends the mount. An agent that is not
   * connected, or does not answer within `waitMs`, loses the export anyway.
   */
  async removeGracefully(mountId: string, reason: string, waitMs = 60_000): Promise<MountRow> {
    const row = this.manager.mounts.get(mountId);
    const s = row?.state === 'active' ? this.sessionOf(row.agent) : undefined;
    if (row && s?.agent?.id === row.agentId && !this.awaitingRelease.has(mountId)) {
      const released = new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, waitMs);
        timer.unref();
        this.awaitingRelease.set(mountId, { reason, done: () => (clearTimeout(timer), resolve()) });
        s.transport.onClose(() => resolve());
      });
      await s.transport.send(envelope('mountRelease', { mountId, reason: reason.slice(0, 1000) })).catch(() => this.awaitingRelease.get(mountId)?.done());
      await released;
      this.awaitingRelease.delete(mountId);
    }
    // Ended by the agent's release meanwhile: remove answers the ended row and does nothing more.
    return this.manager.remove(mountId, reason);
  }

  /**
   * One WAL segment of a live mount of this agent, in 4 MiB pieces, each
   * re-read from the store (which checks its digest) and sent with its
   * SHA-256 so the agent checks it again. Fetches of one mount run one after
   * the other, at most MAX_WAL_FETCHES_QUEUED waiting.
   */
  private walFetch(s: MountPeer, f: WalFetch): void {
    const row = this.manager.mounts.get(f.mountId);
    const images = row && row.agentId === s.agent!.id ? this.manager.imagesOfMount(f.mountId) : undefined;
    if (!images) return this.refuse(s, f.mountId, new BlocksnapError('E_NOT_FOUND', `no live mount ${f.mountId} of agent ${s.agent!.name}`));
    const file = images.flatMap((i) => i.pg?.wal ?? []).find((w) => w.name === f.name);
    if (!file) return this.refuse(s, f.mountId, new BlocksnapError('E_NOT_FOUND', `mount ${f.mountId}: the image needs no WAL segment ${f.name}`));
    let q = this.walQueues.get(f.mountId);
    if (!q) this.walQueues.set(f.mountId, (q = { chain: Promise.resolve(), queued: 0 }));
    if (q.queued >= MAX_WAL_FETCHES_QUEUED) {
      return this.refuse(s, f.mountId, new BlocksnapError('E_BUSY', `mount ${f.mountId}: ${q.queued} WAL fetches already queued`));
    }
    q.queued++;
    const queue = q;
    q.chain = q.chain.then(async () => {
      try {
        for (const p of file.pieces) {
          if (!this.manager.imagesOfMount(f.mountId)) throw new BlocksnapError('E_NOT_FOUND', `mount ${f.mountId} ended`);
          const plain = /^0+$/.test(p.digest) ? Buffer.alloc(p.length) : await this.store.get(Buffer.from(p.digest, 'hex'));
          if (plain.length !== p.length) throw new BlocksnapError('E_STORE_CORRUPT', `WAL ${f.name}@${p.offset}: ${plain.length} bytes, ${p.length} recorded`);
          // Awaiting each send keeps one piece in memory per mount (backpressure of the connection).
          await s.transport.send(envelope('walPiece', {
            jobId: f.mountId, fileName: f.name, offset: p.offset, data: zstdCompress(plain), plainLength: p.length,
            digest: createHash('sha256').update(plain).digest(), fileSize: file.size,
          }));
        }
      } catch (e) {
        this.refuse(s, f.mountId, e);
      } finally {
        queue.queued--;
        if (queue.queued === 0 && this.walQueues.get(f.mountId) === queue) this.walQueues.delete(f.mountId);
      }
    });
  }

  /**
   * The appliance-triggered mount: RunMount to the agent, which asks for the
   * mount (MountRequest with this request id), attaches it, starts
   * PostgreSQL and answers MountResult. Resolves with that result; a lost
   * connection or no answer within `timeoutMs` is an error result.
   */
  runMount(agentName: string, m: Omit<RunMount, 'requestId'>, timeoutMs = 10 * 60_000): { requestId: string; result: Promise<MountResult> } {
    const s = this.sessionOf(agentName);
    if (!s || !s.agent) throw new BlocksnapError('E_NOT_FOUND', `agent ${agentName} is not connected`);
    if (!this.endpoint()) throw new BlocksnapError('E_NOT_FOUND', 'this appliance does not serve NBD (serve --nbd-listen)');
    this.manager.imagesOf(m.imageId); // unknown or damaged: refused before the agent is asked
    if (this.runs.size >= MAX_RUNS) throw new BlocksnapError('E_BUSY', `${this.runs.size} mounts are being started`);
    const requestId = 'mrq-' + randomBytes(8).toString('hex');
    const failed = (code: string, message: string): MountResult => ({
      requestId, ok: false, errorCode: code, errorMessage: message, mountId: '', connection: '', secondsToFirstQuery: 0, target: '', pgPort: 0,
    });
    const result = new Promise<MountResult>((resolve) => {
      const timer = setTimeout(() => settle(failed('E_TIMEOUT', `agent ${agentName} did not answer the mount within ${timeoutMs} ms`)), timeoutMs);
      timer.unref();
      const settle = (r: MountResult) => {
        if (!this.runs.has(requestId)) return;
        this.runs.delete(requestId);
        clearTimeout(timer);
        resolve(r);
      };
      this.runs.set(requestId, { agent: agentName, imageId: m.imageId, settle });
      s.transport.onClose(() => settle(failed('E_DISCONNECTED', `agent ${agentName} disconnected before the mount was up`)));
    });
    s.transport.send(envelope('runMount', { requestId, ...m })).catch(() => undefined);
    this.log.info({ requestId, agent: agentName, image: m.imageId }, 'mount dispatched');
    return { requestId, result };
  }

  /** Mounts a previous appliance process left, ended at this start: told to each agent when it connects. */
  private readonly endedEarlier = new Map<string, MountRow[]>();

  endedBeforeStart(rows: MountRow[]): void {
    for (const r of rows) {
      const l = this.endedEarlier.get(r.agent) ?? [];
      l.push(r);
      this.endedEarlier.set(r.agent, l);
    }
  }

  /**
   * An agent connected. A new agent process (another instance id) released
   * at its start every mount an earlier one left (LocalMounter.cleanupOrphans):
   * those mounts end here. And it unmounts what a previous appliance process
   * had granted it (its exports are gone).
   */
  sessionReady(s: MountPeer): void {
    for (const m of this.manager.mounts.list()) {
      const granted = this.grantedTo.get(m.id);
      if (m.agentId !== s.agent!.id || granted === undefined || granted === s.instanceId) continue;
      this.grantedTo.delete(m.id);
      this.releasedByAgent.add(m.id);
      void this.manager.remove(m.id, 'the agent restarted: it releases what an earlier run left at its start')
        .catch((e) => this.log.error({ mount: m.id, err: e }, 'cannot end the mount of a restarted agent'))
        .finally(() => this.releasedByAgent.delete(m.id));
    }
    const rows = this.endedEarlier.get(s.agent!.name);
    if (!rows) return;
    this.endedEarlier.delete(s.agent!.name);
    for (const r of rows) {
      s.transport.send(envelope('mountRelease', { mountId: r.id, reason: (r.endReason ?? 'appliance restarted').slice(0, 1000) })).catch(() => undefined);
    }
  }

  /** A mount ended on the appliance (removed, expired): its agent unmounts. */
  ended(m: MountRow, reason: string): void {
    this.grantedTo.delete(m.id);
    if (this.releasedByAgent.has(m.id)) return;
    this.sessionOf(m.agent)?.transport.send(envelope('mountRelease', { mountId: m.id, reason: reason.slice(0, 1000) })).catch(() => undefined);
  }

  close(): void {
    for (const r of [...this.runs.values()]) {
      r.settle({ requestId: '', ok: false, errorCode: 'E_CANCELLED', errorMessage: 'appliance stopping', mountId: '', connection: '', secondsToFirstQuery: 0, target: '', pgPort: 0 });
    }
  }
}

function exportOf(x: { volume: string; imageId: string; exportName: string }, img: MountImage): MountExport {
  const pg = img.pg;
  return {
    volume: x.volume, imageId: x.imageId, exportName: x.exportName, size: img.size, chunkSize: img.chunkSize,
    ...(pg ? {
      pg: {
        labelFile: pg.labelFile, spcmapFile: pg.spcmapFile, stopLsn: pg.stopLsn, timeline: pg.timeline, serverVersion: pg.serverVersion,
        role: pg.role, wal: pg.wal.map((w) => w.name),
      },
    } : {}),
  };
}
