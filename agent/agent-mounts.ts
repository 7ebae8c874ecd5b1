/**
 * The agent's side of instant mount (DESIGN.md §4.5): asks the appliance for
 * a mount (MountRequest → MountGranted), turns the grant into a MountGrant of
 * nbd://HOST:PORT/EXPORT URIs (HOST: the host of the agent's appliance URL),
 * hands it to the injected LocalMounter (agent/mount/), fetches the WAL the
 * image needs over the session (WalFetch → WalPiece, each piece's SHA-256
 * checked), and releases the mount on the appliance when it unmounts. Also
 * runs the appliance-triggered mount (RunMount → MountResult).
 */
import { createHash, randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import { BlocksnapError, toBlocksnapError } from '../proto/errors.js';
import { envelope, type Envelope, type ErrorMessage, type MountGranted, type RunMount, type WalPiece } from '../proto/messages.js';
import { zstdDecompress } from '../proto/shared/zstd.js';
import type { LocalMount, LocalMounter, MountGrant, WalSource } from './mount/mount-port.js';
import { checkRestoredCluster, type RestoreCheckResult } from './mount/restore-check.js';

export interface MountImageRequest {
  imageId: string;
  pgPort?: number;
  target?: string;
  asStandby?: boolean;
  /** Default true: PostgreSQL writes to its data directory (into the appliance's overlay, never the image). */
  writable?: boolean;
  ttlSeconds?: number;
}

export interface AgentMountsDeps {
  mounter: LocalMounter | null;
  /** The appliance URL (ws:// or wss://): its host is where the NBD exports are. */
  applianceUrl: string;
  send: (env: Envelope) => Promise<void>;
  waitConnected: (ms: number) => Promise<void>;
  log: Logger;
  /** How long the appliance may take to grant (default 60 s), to send one WAL segment (default 120 s), to acknowledge a release (default 10 s). */
  grantTimeoutMs?: number;
  walTimeoutMs?: number;
  releaseAckMs?: number;
}

interface Pending<T> {
  resolve: (v: T) => void;
  reject: (e: BlocksnapError) => void;
  timer: NodeJS.Timeout;
}

interface WalAssembly extends Pending<Buffer> {
  mountId: string;
  name: string;
  buf: Buffer | null;
  next: number;
}

/** The largest WAL segment PostgreSQL allows (1 GiB), the bound of one fetch. */
const MAX_WAL_FILE = 1 << 30;

export class AgentMounts {
  private readonly grants = new Map<string, Pending<MountGranted>>();
  private readonly wal = new Set<WalAssembly>();
  /** Releases sent, waiting for the appliance's MountRelease back. */
  private readonly releaseAcks = new Map<string, () => void>();

  constructor(private readonly d: AgentMountsDeps) {}

  private get mounter(): LocalMounter {
    if (!this.d.mounter) throw new BlocksnapError('E_CONFIG', 'this agent has no LocalMounter (instant mount is not available here)');
    return this.d.mounter;
  }

  /** What an earlier (killed) agent left mounted: released, and told to the log. */
  async cleanupOrphans(): Promise<string[]> {
    if (!this.d.mounter) return [];
    const released = await this.d.mounter.cleanupOrphans();
    if (released.length) this.d.log.warn({ released }, 'released mounts an earlier run left');
    return released;
  }

  /** Mounts an image: grant, attach, mount, prepare, start PostgreSQL. A failure releases the grant. */
  async mount(req: MountImageRequest, requestId = 'mrq-' + randomBytes(8).toString('hex')): Promise<LocalMount> {
    const mounter = this.mounter;
    const g = await this.requestGrant(requestId, req);
    const grant = this.grantOf(g);
    try {
      return await mounter.mount(grant, this.walSource(g.mountId), { pgPort: req.pgPort || undefined, target: req.target || undefined, asStandby: req.asStandby });
    } catch (e) {
      // The mounter released its local steps; the appliance's side goes too.
      await this.release(g.mountId, 'mount failed on the agent');
      throw toBlocksnapError(e);
    }
  }

  /** Reverses every local step, then ends the mount on the appliance. */
  async unmount(mountId: string): Promise<void> {
    await this.mounter.unmount(mountId);
    await this.release(mountId, 'unmounted by the agent');
  }

  list(): Promise<LocalMount[]> {
    return this.mounter.list();
  }

  /** Agent stop: every mount goes (its NBD connections would outlive nothing useful). */
  async unmountAll(): Promise<void> {
    if (!this.d.mounter) return;
    for (const m of await this.d.mounter.list().catch(() => [] as LocalMount[])) {
      await this.unmount(m.mountId).catch((e) => this.d.log.error({ mount: m.mountId, err: e }, 'unmount at stop failed'));
    }
  }

  /** An appliance frame of a mount; true if it was one (an Error is ours only if it names a pending request or mount). */
  deliver(env: Envelope): boolean {
    switch (env.kind) {
      case 'mountGranted':
        this.settle(this.grants, env.mountGranted.requestId, (p) => p.resolve(env.mountGranted));
        return true;
      case 'walPiece':
        this.piece(env.walPiece);
        return true;
      case 'runMount':
        void this.runMount(env.runMount);
        return true;
      case 'mountRelease': {
        const ack = this.releaseAcks.get(env.mountRelease.mountId);
        if (ack) ack(); // the appliance ended the mount we released
        else void this.onAppliancesRelease(env.mountRelease.mountId, env.mountRelease.reason);
        return true;
      }
      case 'error':
        return this.error(env.error);
      default:
        return false;
    }
  }

  /** The connection dropped: grants and WAL fetches in flight cannot be answered any more. */
  disconnected(): void {
    const e = new BlocksnapError('E_DISCONNECTED', 'the connection to the appliance was lost');
    for (const id of [...this.grants.keys()]) this.settle(this.grants, id, (p) => p.reject(e));
    for (const w of [...this.wal]) this.endWal(w, e);
    for (const ack of [...this.releaseAcks.values()]) ack();
  }

  private async requestGrant(requestId: string, req: MountImageRequest): Promise<MountGranted> {
    await this.d.waitConnected(15_000);
    const granted = new Promise<MountGranted>((resolve, reject) => {
      const timer = setTimeout(() => this.settle(this.grants, requestId, (p) => p.reject(new BlocksnapError('E_TIMEOUT', `no answer to mount request ${requestId}`))),
        this.d.grantTimeoutMs ?? 60_000);
      this.grants.set(requestId, { resolve, reject, timer });
    });
    await this.d.send(envelope('mountRequest', {
      requestId, imageId: req.imageId, writable: req.writable ?? true, ttlSeconds: req.ttlSeconds ?? 0,
    })).catch((e) => this.settle(this.grants, requestId, (p) => p.reject(toBlocksnapError(e, 'E_DISCONNECTED'))));
    const g = await granted;
    if (g.imageId !== req.imageId) {
      await this.release(g.mountId, 'grant for another image');
      throw new BlocksnapError('E_PROTOCOL', `mount request ${requestId} for ${req.imageId} was granted for ${g.imageId}`);
    }
    return g;
  }

  /** The LocalMounter's view: one nbd:// (nbds:// with TLS) URI per export, on the appliance's host. */
  grantOf(g: MountGranted): MountGrant {
    const host = new URL(this.d.applianceUrl).hostname; // [v6] stays bracketed, as a URI wants it
    const scheme = g.tls ? 'nbds' : 'nbd';
    return {
      mountId: g.mountId, imageId: g.imageId, writable: g.writable, ...(g.expiresAt ? { expiresAt: g.expiresAt } : {}),
      exports: g.exports.map((x) => ({
        volume: x.volume, imageId: x.imageId, uri: `${scheme}://${host}:${g.nbdPort}/${x.exportName}`, size: x.size, chunkSize: x.chunkSize,
        ...(x.pg ? {
          pg: {
            labelFile: x.pg.labelFile, spcmapFile: x.pg.spcmapFile, stopLsn: x.pg.stopLsn, timeline: x.pg.timeline,
            serverVersion: x.pg.serverVersion, role: x.pg.role, wal: [...x.pg.wal],
          },
        } : {}),
      })),
    };
  }

  /** Fetches one WAL segment of the mount, piece by piece, in order, each SHA-256 checked. */
  walSource(mountId: string): WalSource {
    return async (_imageId, name) => {
      if (!/^[0-9A-F]{24}$/.test(name)) throw new BlocksnapError('E_USAGE', `not a WAL segment name: ${name}`);
      const p = new Promise<Buffer>((resolve, reject) => {
        const w: WalAssembly = {
          mountId, name, buf: null, next: 0, resolve, reject,
          timer: setTimeout(() => this.endWal(w, new BlocksnapError('E_TIMEOUT', `WAL ${name} of mount ${mountId}: not received in time`)), this.d.walTimeoutMs ?? 120_000),
        };
        this.wal.add(w);
      });
      await this.d.send(envelope('walFetch', { mountId, name }));
      return p;
    };
  }

  private piece(p: WalPiece): void {
    const w = [...this.wal].find((x) => x.mountId === p.jobId && x.name === p.fileName);
    if (!w) return void this.d.log.warn({ mount: p.jobId, file: p.fileName }, 'WAL piece nobody asked for: dropped');
    try {
      if (p.fileSize > MAX_WAL_FILE) throw new BlocksnapError('E_PROTOCOL', `WAL ${p.fileName}: ${p.fileSize} bytes is no segment size`);
      w.buf ??= Buffer.alloc(p.fileSize);
      if (p.fileSize !== w.buf.length || p.offset !== w.next) throw new BlocksnapError('E_PROTOCOL', `WAL ${p.fileName}: piece at ${p.offset}, ${w.next} expected`);
      const plain = zstdDecompress(p.data, p.plainLength); // bounded by plainLength
      if (!createHash('sha256').update(plain).digest().equals(p.digest)) {
        throw new BlocksnapError('E_DIGEST_MISMATCH', `WAL ${p.fileName}@${p.offset}: SHA-256 of the piece differs`);
      }
      plain.copy(w.buf, p.offset);
      w.next += plain.length;
      if (w.next === w.buf.length) this.endWal(w, null);
    } catch (e) {
      this.endWal(w, toBlocksnapError(e, 'E_PROTOCOL'));
    }
  }

  private endWal(w: WalAssembly, err: BlocksnapError | null): void {
    if (!this.wal.delete(w)) return;
    clearTimeout(w.timer);
    if (err) w.reject(err);
    else w.resolve(w.buf!);
  }

  private error(e: ErrorMessage): boolean {
    const err = new BlocksnapError(codeOf(e.code), `appliance: ${e.message}`);
    if (this.grants.has(e.jobId)) {
      this.settle(this.grants, e.jobId, (p) => p.reject(err));
      return true;
    }
    const fetches = [...this.wal].filter((w) => w.mountId === e.jobId);
    for (const w of fetches) this.endWal(w, err);
    return fetches.length > 0;
  }

  private settle<T>(map: Map<string, Pending<T>>, id: string, fn: (p: Pending<T>) => void): void {
    const p = map.get(id);
    if (!p) return;
    map.delete(id);
    clearTimeout(p.timer);
    fn(p);
  }

  /**
   * Tells the appliance the mount is gone and waits (bounded) for its
   * MountRelease back: then the mount is ended there and its overlay deleted,
   * so an `unmount` that returned means the image is no longer mounted.
   */
  private async release(mountId: string, reason: string): Promise<void> {
    const acked = new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, this.d.releaseAckMs ?? 10_000);
      this.releaseAcks.set(mountId, () => {
        clearTimeout(timer);
        this.releaseAcks.delete(mountId);
        resolve();
      });
    });
    try {
      await this.d.send(envelope('mountRelease', { mountId, reason }));
    } catch (e) {
      // The appliance ends the mount anyway when it stops, or when this agent's next process connects.
      this.d.log.warn({ mount: mountId, err: toBlocksnapError(e).code }, 'could not tell the appliance the mount was released');
      this.releaseAcks.get(mountId)?.();
    }
    await acked;
    this.releaseAcks.delete(mountId);
  }

  /** The appliance ends a mount (an operator's removal, expiry): unmount here, then say so. */
  private async onAppliancesRelease(mountId: string, reason: string): Promise<void> {
    if (!this.d.mounter) return;
    const mine = (await this.d.mounter.list().catch(() => [] as LocalMount[])).some((m) => m.mountId === mountId);
    if (mine) {
      this.d.log.warn({ mount: mountId, reason }, 'the appliance ends a mount: unmounting it');
      await this.d.mounter.unmount(mountId).catch((e) => this.d.log.error({ mount: mountId, err: e }, 'unmount after the appliance ended the mount failed'));
    }
    // An operator's removal waits for this to drop the export only after the copy is down.
    await this.release(mountId, 'unmounted: the appliance asked');
  }

  /** The restore check of a RunMount{verify} (agent/mount/restore-check.ts), then the unmount. */
  private async checkAndUnmount(m: LocalMount): Promise<RestoreCheckResult> {
    let check: RestoreCheckResult;
    try {
      check = await checkRestoredCluster(m.connection);
    } catch (e) {
      check = checkFailed(e);
    }
    this.d.log.info({ mount: m.mountId, ok: check.ok, problems: check.problems.length, seconds: check.seconds }, 'restore check done');
    await this.unmount(m.mountId);
    return check;
  }

  /** `blocksnap-appliance mount IMAGE --on AGENT`: the same mount, its result sent back. */
  private async runMount(r: RunMount): Promise<void> {
    let result;
    try {
      const m = await this.mount({ imageId: r.imageId, pgPort: r.pgPort, target: r.target, asStandby: r.asStandby, writable: r.writable }, r.requestId);
      result = {
        requestId: r.requestId, ok: true, errorCode: '', errorMessage: '', mountId: m.mountId, connection: m.connection,
        secondsToFirstQuery: m.secondsToFirstQuery, target: m.target, pgPort: m.pgPort,
        // verify --restore: check the running copy, then unmount it (also when the check throws).
        ...(r.verify ? { check: await this.checkAndUnmount(m) } : {}),
      };
    } catch (e) {
      const err = toBlocksnapError(e);
      this.d.log.error({ request: r.requestId, image: r.imageId, code: err.code, message: err.message }, 'mount asked by the appliance failed');
      result = {
        requestId: r.requestId, ok: false, errorCode: err.code, errorMessage: err.message.slice(0, 4000), mountId: '', connection: '',
        secondsToFirstQuery: 0, target: '', pgPort: 0,
      };
    }
    await this.d.send(envelope('mountResult', result)).catch(() => undefined);
  }
}

/** A check that could not run at all is a failed check saying why. */
function checkFailed(e: unknown): RestoreCheckResult {
  return {
    ok: false, method: 'amcheck (SQL)', serverVersion: 0, databases: 0, heapsChecked: 0, indexesChecked: 0, tables: [],
    problems: [{ database: '', relation: '', message: toBlocksnapError(e).message.slice(0, 4000) }], seconds: 0,
  };
}

function codeOf(code: string): BlocksnapError['code'] {
  return (/^E_[A-Z_]+$/.test(code) ? code : 'E_INTERNAL') as BlocksnapError['code'];
}
