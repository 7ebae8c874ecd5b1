import type { IncomingMessage } from 'node:http';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { makePrivateDirSync } from '../../proto/shared/durable-file.js';
import type { Transport } from '../../proto/transport.js';
import type { PreAuthOptions } from '../../proto/ws-transport.js';
import { Catalog } from '../catalog/catalog.js';
import type { RecoveringChunkStore } from '../store/chunk-store.js';
import type { ManifestStore } from '../store/manifest-store.js';
import { AgentSession } from './agent-session.js';
import { AuthGuard, type AuthGuardLimits } from './auth-guard.js';
import { ControlServer } from './control-server.js';
import { takeDataDirLock } from './data-lock.js';
import { JobRouter } from './job-router.js';
import { checkImages, lostAnything, openCatalogOrRecover, rollForward } from './recovery.js';
import { Retention } from '../retention/retention-service.js';
import { finishDeletions } from '../retention/retention-catalog.js';
import { runningBasesOf } from '../retention/running-bases.js';
import type { NbdExportResolver } from '../nbd/nbd-export.js';
import type { ChunkStore } from '../store/chunk-store.js';
import { BlocksnapError } from '../../proto/errors.js';
import type { MountBackend } from '../mounts/mount-backend.js';
import { MountManager } from '../mounts/mount-manager.js';
import { MountProtocol } from '../mounts/mount-protocol.js';

export { rollForward };

/** Where a store lives: the appliance's data directory and its `store/`. */
export interface StoreContext {
  dataDir: string;
  storeDir: string;
  logger?: Logger;
}

/** What the appliance asks of its agent endpoint's listener (today WsTransportServer). */
export interface ListenOptions {
  host: string;
  port: number;
  maxFrameBytes: number;
  tls?: { cert: Buffer; key: Buffer };
  preAuth: PreAuthOptions;
}
export interface AgentListener {
  readonly url: string;
  readonly port: number;
  close(): Promise<void>;
}

/** What the appliance asks of its NBD listener for mounts (appliance/nbd/nbd-server.ts). */
export interface NbdListenOptions {
  resolve: NbdExportResolver;
  host: string;
  port: number;
  tls?: { cert: Buffer; key: Buffer };
  logger: Logger;
}
export interface NbdListener {
  readonly port: number;
  readonly tls: boolean;
  close(): Promise<void>;
}

/**
 * The appliance's ports, composed by its CLI (appliance/compose.ts) and test
 * fixtures: nothing below them names a concrete store or listener. Stores are
 * opened once the data directory's lock is held.
 */
export interface ApplianceBackends {
  openChunkStore(ctx: StoreContext): Promise<RecoveringChunkStore>;
  openManifestStore(ctx: StoreContext): ManifestStore;
  listen(opts: ListenOptions, onTransport: (t: Transport, req: IncomingMessage) => void): Promise<AgentListener>;
  /** The NBD listener of instant mounts (absent: no NBD is served, mount requests are refused). */
  listenNbd?(opts: NbdListenOptions): Promise<NbdListener>;
  /** Builds mount exports from the store (image source + copy-on-write overlay). */
  mountBackend?(store: ChunkStore): MountBackend;
}

export interface ApplianceOptions {
  dataDir: string;
  logger: Logger;
  backends: ApplianceBackends;
  maxFrameBytes?: number;
  windowBytes?: number;
  resumeGraceMs?: number;
  /** A job whose agent sends nothing for it (not even its heartbeat) this long fails E_TIMEOUT. */
  jobIdleTimeoutMs?: number;
  authTimeoutMs?: number;
  flushEveryBytes?: number;
  auditEvery?: number;
  /** Serve wss:// with this certificate and key (PEM). */
  tls?: { cert: Buffer; key: Buffer };
  /** Bytes a connection may send before it authenticates (DESIGN.md §4.2; default 64 KiB: a Hello and an AuthProof). */
  preAuthBytes?: number;
  /** Pre-authentication connection and failed-attempt bounds (auth-guard.ts). */
  authGuard?: Partial<AuthGuardLimits>;
  /** NBD listener of mounts (DESIGN.md §10): default the agent listener's host, its port + 1 (a free port when that is 0). */
  nbd?: { host: string; port: number };
}

/**
 * The appliance process: one data directory (catalog + store), an endpoint
 * for agents (the injected listener: WebSocket) and a control socket for the
 * CLI. Its chunk store, manifest store and listener come from `backends`. Only one process
 * may own a data directory (a kernel lock, data-lock.ts). At start it makes
 * the data directory 0700, recovers what it can (recovery.ts: quarantine,
 * damaged images), rolls the catalog forward from the manifests, removes the
 * packs of jobs that never committed, and fails jobs a previous process left
 * running. One damaged file never stops it (DESIGN.md §6).
 */
export class Appliance {
  private ws: AgentListener | null = null;
  private control: ControlServer | null = null;
  private nbd: NbdListener | null = null;
  /** The instant-mount messages of agent sessions (DESIGN.md §4.5). */
  readonly mountProtocol: MountProtocol;
  /** Every agent connection, authenticated or not (to end an agent's sessions on `agents rotate`). */
  private readonly sessions = new Set<AgentSession>();
  readonly guard: AuthGuard;
  /** Delete, pin, prune, GC, store usage (DESIGN.md §12): never removes a mounted image, a running job's basis, or a leased one. */
  readonly retention: Retention;

  private constructor(
    readonly opts: ApplianceOptions,
    readonly catalog: Catalog,
    readonly store: RecoveringChunkStore,
    readonly manifests: ManifestStore,
    readonly router: JobRouter,
    private readonly releaseLock: () => void,
    /** Mounts as catalog objects; the NBD server's export resolver (DESIGN.md §6.2). */
    readonly mounts: MountManager,
  ) {
    this.guard = new AuthGuard(opts.authGuard);
    this.retention = new Retention({
      catalog, store, manifests, log: opts.logger, isMounted: (id) => mounts.isMounted(id), runningBases: () => runningBasesOf(router, catalog),
      inUse: () => router.restores.active().map((r) => ({ imageId: r.imageId, what: `restore to agent ${r.agent}` })),
    });
    this.mountProtocol = new MountProtocol(mounts, store, () => (this.nbd ? { port: this.nbd.port, tls: this.nbd.tls } : null),
      (name) => router.sessionOfAgent(name), opts.logger);
    mounts.onEnded = (m, reason) => this.mountProtocol.ended(m, reason);
    this.mountProtocol.endedBeforeStart(mounts.endedAtStart);
  }

  static async open(opts: ApplianceOptions): Promise<Appliance> {
    const log = opts.logger;
    makePrivateDirSync(opts.dataDir); // 0700 whatever the umask, also for a directory made by an older version
    const lock = takeDataDirLock(opts.dataDir, 'appliance');
    const releaseLock = () => lock.release();
    let catalog: Catalog | undefined;
    let store: RecoveringChunkStore | undefined;
    try {
      const recovered = await openCatalogOrRecover(opts.dataDir, log);
      catalog = recovered.catalog;
      const where: StoreContext = { dataDir: opts.dataDir, storeDir: join(opts.dataDir, 'store'), logger: log };
      store = await opts.backends.openChunkStore(where);
      const manifests = opts.backends.openManifestStore(where);
      const q = { quarantined: [...store.recovery.quarantined] };
      // Deletions a crash interrupted finish first, or roll-forward would bring their images back (§12.1).
      await finishDeletions(catalog, manifests);
      const rolled = await rollForward(catalog, manifests, recovered.rebuilt !== null, log, q);
      const cat = catalog;
      const cleanup = await store.resolvePending((root) => cat.hasRoot(root));
      const damaged = await checkImages(catalog, store, manifests, {
        deep: lostAnything(store) || recovered.rebuilt !== null, lost: store.recovery.lostBlobs, quarantined: store.recovery.quarantined, log,
      });
      const failed = catalog.failInterruptedJobs();
      if (rolled || failed || cleanup.removedPacks.length || q.quarantined.length || damaged.length) {
        log.info({
          rolledForward: rolled, interruptedJobs: failed, removedUncommittedPacks: cleanup.removedPacks.length,
          removedBytes: cleanup.removedBytes, quarantined: q.quarantined.map((r) => r.object), damagedImages: damaged.map((d) => d.imageId),
        }, 'recovered from previous run');
      }
      const router = new JobRouter(catalog, store, {
        manifests,
        resumeGraceMs: opts.resumeGraceMs ?? 10 * 60_000,
        jobIdleTimeoutMs: opts.jobIdleTimeoutMs,
        windowBytes: opts.windowBytes ?? 32 << 20,
        flushEveryBytes: opts.flushEveryBytes,
        auditEvery: opts.auditEvery ?? 10,
      }, log);
      // Every mount of a previous process ended with it: its rows are ended, its overlays removed (mount-manager.ts).
      const backend = opts.backends.mountBackend?.(store) ?? noMountBackend;
      const mounts = new MountManager({ catalog, backend, dataDir: opts.dataDir, log });
      await mounts.start();
      return new Appliance(opts, catalog, store, manifests, router, releaseLock, mounts);
    } catch (e) {
      await store?.close().catch(() => undefined);
      catalog?.close();
      releaseLock();
      throw e;
    }
  }

  async listen(host: string, port: number): Promise<{ url: string; port: number; nbdPort: number | null }> {
    const limits = {
      maxFrameBytes: this.opts.maxFrameBytes ?? 8 << 20,
      windowBytes: this.opts.windowBytes ?? 32 << 20,
      authTimeoutMs: this.opts.authTimeoutMs ?? 10_000,
    };
    // Pre-authentication bounds (DESIGN.md §4.2): counted from the TCP accept, bucket checked at the upgrade.
    const preAuth = {
      maxBytes: this.opts.preAuthBytes ?? 64 << 10,
      onSocket: (socket: Socket) => this.guard.track(socket, limits.authTimeoutMs + 1000),
      admit: (req: IncomingMessage) => {
        const a = this.guard.admitAttempt(req.socket.remoteAddress ?? '');
        return a.ok ? null : { status: a.status, reason: a.reason };
      },
    };
    this.ws = await this.opts.backends.listen({ host, port, maxFrameBytes: limits.maxFrameBytes, tls: this.opts.tls, preAuth }, (t, req) => {
      const address = req.socket.remoteAddress ?? '';
      const s = new AgentSession(t, this.router, this.opts.logger, {
        ...limits, guard: this.guard, address, endPreAuth: this.guard.slotOf(address, req.socket.remotePort),
      });
      this.sessions.add(s);
      t.onClose(() => this.sessions.delete(s));
    });
    if (this.opts.backends.listenNbd) {
      const nbd = this.opts.nbd ?? { host, port: this.ws.port === 0 || port === 0 ? 0 : this.ws.port + 1 };
      this.nbd = await this.opts.backends.listenNbd({ resolve: this.mounts.resolve, host: nbd.host, port: nbd.port, tls: this.opts.tls, logger: this.opts.logger })
        .catch((e) => {
          const errno = (e as NodeJS.ErrnoException)?.code;
          throw new BlocksnapError(errno === 'EADDRINUSE' ? 'E_BUSY' : 'E_USAGE', `--nbd-listen ${nbd.host}:${nbd.port}: cannot listen: ${errno ?? (e as Error).message}`, { cause: e });
        });
      this.router.mountFrames = (s, env) => this.mountProtocol.onFrame(s, env);
      this.router.onSessionReady = (s) => this.mountProtocol.sessionReady(s);
    }
    this.control = await ControlServer.listen(join(this.opts.dataDir, 'control.sock'), this, this.opts.logger);
    this.opts.logger.info({ url: this.ws.url, nbdPort: this.nbd?.port }, 'appliance listening');
    return { url: this.ws.url, port: this.ws.port, nbdPort: this.nbd?.port ?? null };
  }

  /** The port NBD clients of mounts connect to; null when none is served. */
  get nbdPort(): number | null {
    return this.nbd?.port ?? null;
  }

  /**
   * Ends every connection of agent `name` and aborts its running jobs: after
   * `agents rotate` nothing authenticated with the old secret may go on.
   * Returns the number of connections closed.
   */
  endAgent(name: string, reason: string): number {
    for (const j of this.router.activeJobs()) if (j.agent === name && !j.finished) this.router.cancelJob(j.id, reason);
    let n = 0;
    for (const s of this.sessions) {
      if (s.agent?.name !== name) continue;
      s.refuse('E_AUTH', reason);
      n++;
    }
    return n;
  }

  async close(): Promise<void> {
    await this.router.shutdown();
    this.mountProtocol.close();
    await this.control?.close();
    await this.ws?.close();
    // Mount connections end with the process; the next start ends the rows and tells the agents (DESIGN.md §6.2).
    await this.nbd?.close();
    await this.mounts.close();
    // Let aborted ingests remove their temp packs before the store closes.
    await Promise.all(this.router.activeJobs().map((j) => j.chain));
    await this.store.close();
    this.catalog.close();
    this.releaseLock();
  }
}

export { lockHolder } from './data-lock.js';

/** Composed without a mount backend: nothing can be mounted. */
const noMountBackend: MountBackend = {
  createOverlay: async () => {
    throw new BlocksnapError('E_NOT_FOUND', 'this appliance cannot mount images');
  },
  open: async () => {
    throw new BlocksnapError('E_NOT_FOUND', 'this appliance cannot mount images');
  },
};
