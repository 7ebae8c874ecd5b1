import { mkdirSync, readFileSync, rmSync, writeFileSync, openSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { BlocksnapError } from '../../proto/errors.js';
import { WsTransportServer } from '../../proto/ws-transport.js';
import { Catalog } from '../catalog/catalog.js';
import { FsChunkStore } from '../store/fs-chunk-store.js';
import { listManifests, readManifest, removeManifest } from '../store/manifest.js';
import { AgentSession } from './agent-session.js';
import { AuthGuard, type AuthGuardLimits } from './auth-guard.js';
import { ControlServer } from './control-server.js';
import { JobRouter } from './job-router.js';

export interface ApplianceOptions {
  dataDir: string;
  logger: Logger;
  maxFrameBytes?: number;
  windowBytes?: number;
  resumeGraceMs?: number;
  authTimeoutMs?: number;
  flushEveryBytes?: number;
  auditEvery?: number;
  /** Serve wss:// with this certificate and key (PEM). */
  tls?: { cert: Buffer; key: Buffer };
  /** Bytes a connection may send before it authenticates (DESIGN.md §4.2; default 64 KiB: a Hello and an AuthProof). */
  preAuthBytes?: number;
  /** Pre-authentication connection and failed-attempt bounds (auth-guard.ts). */
  authGuard?: Partial<AuthGuardLimits>;
}

/**
 * The appliance process: one data directory (catalog + store), a WebSocket
 * endpoint for agents and a control socket for the CLI. Only one process
 * may own a data directory (a pid lock); at start it rolls the catalog
 * forward from the manifests and fails jobs a previous process left running.
 */
export class Appliance {
  private ws: WsTransportServer | null = null;
  private control: ControlServer | null = null;
  /** Every agent connection, authenticated or not (to end an agent's sessions on `agents rotate`). */
  private readonly sessions = new Set<AgentSession>();
  readonly guard: AuthGuard;

  private constructor(
    readonly opts: ApplianceOptions,
    readonly catalog: Catalog,
    readonly store: FsChunkStore,
    readonly router: JobRouter,
    private readonly releaseLock: () => void,
  ) {
    this.guard = new AuthGuard(opts.authGuard);
  }

  static async open(opts: ApplianceOptions): Promise<Appliance> {
    mkdirSync(opts.dataDir, { recursive: true });
    const releaseLock = takeLock(join(opts.dataDir, 'appliance.pid'));
    try {
      const catalog = Catalog.open(join(opts.dataDir, 'catalog.sqlite'));
      const storeDir = join(opts.dataDir, 'store');
      const store = await FsChunkStore.open(storeDir, { logger: opts.logger });
      const rolled = await rollForward(catalog, storeDir, false, opts.logger);
      const failed = catalog.failInterruptedJobs();
      if (rolled || failed) opts.logger.info({ rolledForward: rolled, interruptedJobs: failed }, 'recovered from previous run');
      const router = new JobRouter(catalog, store, {
        storeDir,
        resumeGraceMs: opts.resumeGraceMs ?? 10 * 60_000,
        windowBytes: opts.windowBytes ?? 32 << 20,
        flushEveryBytes: opts.flushEveryBytes,
        auditEvery: opts.auditEvery ?? 10,
      }, opts.logger);
      return new Appliance(opts, catalog, store, router, releaseLock);
    } catch (e) {
      releaseLock();
      throw e;
    }
  }

  async listen(host: string, port: number): Promise<{ url: string; port: number }> {
    const limits = {
      maxFrameBytes: this.opts.maxFrameBytes ?? 8 << 20,
      windowBytes: this.opts.windowBytes ?? 32 << 20,
      authTimeoutMs: this.opts.authTimeoutMs ?? 10_000,
    };
    const preAuth = {
      maxBytes: this.opts.preAuthBytes ?? 64 << 10,
      admit: (req: import('node:http').IncomingMessage) => {
        const a = this.guard.admit(req.socket.remoteAddress ?? '');
        return a.ok ? null : { status: a.status, reason: a.reason };
      },
    };
    this.ws = await WsTransportServer.listen({ host, port, maxFrameBytes: limits.maxFrameBytes, tls: this.opts.tls, preAuth }, (t, req) => {
      const s = new AgentSession(t, this.router, this.opts.logger, { ...limits, guard: this.guard, address: req.socket.remoteAddress ?? '' });
      this.sessions.add(s);
      t.onClose(() => this.sessions.delete(s));
    });
    this.control = await ControlServer.listen(join(this.opts.dataDir, 'control.sock'), this, this.opts.logger);
    this.opts.logger.info({ url: this.ws.url }, 'appliance listening');
    return { url: this.ws.url, port: this.ws.port };
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
    await this.control?.close();
    await this.ws?.close();
    // Let aborted ingests remove their temp packs before the store closes.
    await Promise.all(this.router.activeJobs().map((j) => j.chain));
    await this.store.close();
    this.catalog.close();
    this.releaseLock();
  }
}

/**
 * Inserts a catalog row for every manifest that lacks one (DESIGN.md §5 step
 * 4). A manifest of an image set whose other members' manifests are not all
 * in the store is the trace of a crash inside the set's commit: the set was
 * never visible (its catalog rows come after all its manifests), so that
 * manifest is deleted, never listed. Only manifests without a row are read:
 * a set with rows was complete.
 */
export async function rollForward(catalog: Catalog, storeDir: string, createAgents: boolean, log?: Logger): Promise<number> {
  const have = catalog.imageIds();
  const present = new Set(await listManifests(storeDir));
  const rows: Parameters<Catalog['insertImage']>[0][] = [];
  for (const id of present) {
    if (have.has(id)) continue;
    const m = await readManifest(storeDir, id);
    if (m.set && !m.set.images.every((i) => present.has(i))) {
      log?.warn({ image: id, set: m.set.id, missing: m.set.images.filter((i) => !present.has(i)) }, 'removing a manifest of an incomplete image set');
      await removeManifest(storeDir, id);
      continue;
    }
    rows.push({
      id: m.imageId, agent: m.agent, volume: m.volume, jobId: m.jobId, kind: m.kind, basisImageId: m.basisImageId,
      rootDigest: m.rootDigest, volumeSize: m.volumeSize, chunkSize: m.chunkSize, createdAt: m.createdAt, stats: m.stats,
      pg: m.pg ?? null, setId: m.set?.id ?? null,
    });
  }
  // One transaction: the members of a set appear together.
  catalog.insertImages(rows, { createAgent: createAgents });
  return rows.length;
}

/** A pid file taken with O_EXCL; a stale one (dead pid) is replaced. */
function takeLock(file: string): () => void {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(file, 'wx', 0o644);
      writeFileSync(fd, String(process.pid));
      closeSync(fd);
      return () => rmSync(file, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw new BlocksnapError('E_STORE_IO', `cannot create ${file}`, { cause: e });
      const pid = Number(readFileSync(file, 'utf8').trim());
      if (pid > 0 && pidAlive(pid)) throw new BlocksnapError('E_BUSY', `data directory is in use by appliance pid ${pid}`);
      rmSync(file, { force: true });
    }
  }
  throw new BlocksnapError('E_BUSY', `cannot take the lock ${file}`);
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}
